// CPU implementation of the fused linear + vocabulary cross-entropy (unigen._C).
//
// Mirrors the PyTorch reference in kernels/fused_linear_cross_entropy.py: the vocabulary is
// processed in chunks so that only a [rows, chunk] block of logits exists at a time (bounded
// memory); the matmuls go to ATen (BLAS), the per-row online log-sum-exp and the softmax
// gradient run in OpenMP-parallel loops over rows. Math is fp32 for fp16/bf16/fp32 inputs and
// fp64 for fp64 inputs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <tuple>

namespace unigen {
namespace {

// Columns per vocabulary chunk: the [rows, chunk] logits block stays near 32 MiB.
int64_t vocab_chunk(int64_t rows, int64_t vocab, int64_t elem_size) {
  const int64_t budget = int64_t(32) << 20;
  int64_t cols = budget / std::max<int64_t>(1, rows * elem_size);
  cols = std::max<int64_t>(256, (cols / 256) * 256);
  return std::min(cols, vocab);
}

at::ScalarType math_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& target) {
  TORCH_CHECK(hidden.device().is_cpu(), "fused_linear_cross_entropy (cpp): hidden must be a CPU tensor");
  TORCH_CHECK(hidden.dim() == 2, "fused_linear_cross_entropy (cpp): hidden must be [N, D], got ",
              hidden.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1),
              "fused_linear_cross_entropy (cpp): weight must be [V, D] with D = ", hidden.size(1),
              ", got ", weight.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == hidden.size(0),
              "fused_linear_cross_entropy (cpp): target must be [N] with N = ", hidden.size(0),
              ", got ", target.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(),
              "fused_linear_cross_entropy (cpp): weight dtype differs from hidden dtype");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "fused_linear_cross_entropy (cpp): bias must be [V]");
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(),
                "fused_linear_cross_entropy (cpp): bias dtype differs from hidden dtype");
  }
}

at::Tensor logits_chunk(const at::Tensor& h, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, int64_t start, int64_t stop,
                        at::ScalarType acc) {
  at::Tensor z = at::mm(h, weight.slice(0, start, stop).to(acc).t());
  if (bias.has_value()) z.add_(bias->slice(0, start, stop).to(acc));
  return z;
}

template <typename scalar_t>
void forward_chunk(const at::Tensor& z, const int64_t* t, int64_t start, scalar_t* m, scalar_t* s,
                   scalar_t* best, int64_t* best_idx, scalar_t* zt, scalar_t* zsum, bool smoothing) {
  const int64_t rows = z.size(0), cols = z.size(1);
  const scalar_t* zp = z.data_ptr<scalar_t>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* row = zp + r * cols;
      scalar_t cmax = -std::numeric_limits<scalar_t>::infinity();
      int64_t carg = 0;
      scalar_t csum = 0;
      for (int64_t j = 0; j < cols; ++j) {
        if (row[j] > cmax) { cmax = row[j]; carg = j; }  // strict: first maximum, as argmax
        csum += row[j];
      }
      const scalar_t m_new = std::max(m[r], cmax);
      scalar_t acc = 0;
      for (int64_t j = 0; j < cols; ++j) acc += std::exp(row[j] - m_new);
      s[r] = s[r] * std::exp(m[r] - m_new) + acc;
      m[r] = m_new;
      if (cmax > best[r]) { best[r] = cmax; best_idx[r] = carg + start; }
      const int64_t local = t[r] - start;
      if (local >= 0 && local < cols) zt[r] += row[local];
      if (smoothing) zsum[r] += csum;
    }
  });
}

template <typename scalar_t>
void logit_grad_chunk(at::Tensor& z, const int64_t* t, const scalar_t* lse, const scalar_t* g,
                      int64_t start, double label_smoothing, double z_loss, int64_t vocab) {
  const int64_t rows = z.size(0), cols = z.size(1);
  scalar_t* zp = z.data_ptr<scalar_t>();
  const scalar_t eps_v = scalar_t(label_smoothing / double(vocab));
  const scalar_t on_target = scalar_t(1.0 - label_smoothing);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* row = zp + r * cols;
      const scalar_t scale = scalar_t(1) + scalar_t(2.0 * z_loss) * lse[r];
      for (int64_t j = 0; j < cols; ++j) row[j] = (std::exp(row[j] - lse[r]) * scale - eps_v) * g[r];
      const int64_t local = t[r] - start;
      if (local >= 0 && local < cols) row[local] -= on_target * g[r];
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_cross_entropy_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t ignore_index, double label_smoothing, double z_loss) {
  check_inputs(hidden, weight, bias, target);
  const auto acc = math_type(hidden.scalar_type());
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  at::Tensor loss = at::zeros({n}, hidden.options().dtype(acc));
  at::Tensor lse_out = at::zeros({n}, hidden.options().dtype(acc));
  at::Tensor correct = at::zeros({n}, hidden.options().dtype(at::kBool));
  // Ignored rows are dropped before any matmul.
  at::Tensor rows = target.ne(ignore_index).nonzero().squeeze(1);
  const int64_t nv = rows.size(0);
  if (nv == 0) return {loss, lse_out, correct};
  at::Tensor h = hidden.index_select(0, rows).to(acc).contiguous();
  at::Tensor t = target.index_select(0, rows).to(at::kLong).contiguous();
  TORCH_CHECK(t.ge(0).logical_and(t.lt(vocab)).all().item<bool>(),
              "fused_linear_cross_entropy (cpp): target values must be in [0, ", vocab,
              ") or equal ignore_index=", ignore_index);
  at::Tensor m = at::full({nv}, -std::numeric_limits<double>::infinity(), h.options());
  at::Tensor s = at::zeros({nv}, h.options());
  at::Tensor best = at::full({nv}, -std::numeric_limits<double>::infinity(), h.options());
  at::Tensor best_idx = at::zeros({nv}, t.options());
  at::Tensor zt = at::zeros({nv}, h.options());
  at::Tensor zsum = at::zeros({nv}, h.options());
  const int64_t chunk = vocab_chunk(nv, vocab, at::elementSize(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "fused_linear_cross_entropy_cpu", [&] {
    for (int64_t start = 0; start < vocab; start += chunk) {
      const int64_t stop = std::min(start + chunk, vocab);
      at::Tensor z = logits_chunk(h, weight, bias, start, stop, acc).contiguous();
      forward_chunk<scalar_t>(z, t.data_ptr<int64_t>(), start, m.data_ptr<scalar_t>(),
                              s.data_ptr<scalar_t>(), best.data_ptr<scalar_t>(),
                              best_idx.data_ptr<int64_t>(), zt.data_ptr<scalar_t>(),
                              zsum.data_ptr<scalar_t>(), label_smoothing > 0);
    }
  });
  at::Tensor lse = m + at::log(s);
  at::Tensor row_loss = lse - (1.0 - label_smoothing) * zt;
  if (label_smoothing > 0) row_loss = row_loss - (label_smoothing / double(vocab)) * zsum;
  if (z_loss > 0) row_loss = row_loss + z_loss * lse * lse;
  loss.index_copy_(0, rows, row_loss);
  lse_out.index_copy_(0, rows, lse);
  correct.index_copy_(0, rows, best_idx.eq(t));
  return {loss, lse_out, correct};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_cross_entropy_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& target, const at::Tensor& lse,
    int64_t ignore_index, double label_smoothing, double z_loss, std::array<bool, 3> output_mask) {
  check_inputs(hidden, weight, bias, target);
  const bool need_h = output_mask[0], need_w = output_mask[1], need_b = output_mask[2] && bias.has_value();
  const auto acc = math_type(hidden.scalar_type());
  const int64_t vocab = weight.size(0);
  at::Tensor grad_h = need_h ? at::zeros_like(hidden, hidden.options().dtype(acc)) : at::empty({0}, hidden.options());
  at::Tensor grad_w = need_w ? at::zeros_like(weight, weight.options().dtype(acc)) : at::empty({0}, hidden.options());
  at::Tensor grad_b = need_b ? at::zeros({vocab}, weight.options().dtype(acc)) : at::empty({0}, hidden.options());
  at::Tensor rows = target.ne(ignore_index).nonzero().squeeze(1);
  const int64_t nv = rows.size(0);
  if (nv > 0 && (need_h || need_w || need_b)) {
    at::Tensor h = hidden.index_select(0, rows).to(acc).contiguous();
    at::Tensor t = target.index_select(0, rows).to(at::kLong).contiguous();
    at::Tensor g = grad_rows.index_select(0, rows).to(acc).contiguous();
    at::Tensor row_lse = lse.index_select(0, rows).to(acc).contiguous();
    at::Tensor gh = need_h ? at::zeros_like(h) : at::Tensor();
    const int64_t chunk = vocab_chunk(nv, vocab, at::elementSize(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "fused_linear_cross_entropy_backward_cpu", [&] {
      for (int64_t start = 0; start < vocab; start += chunk) {
        const int64_t stop = std::min(start + chunk, vocab);
        at::Tensor z = logits_chunk(h, weight, bias, start, stop, acc).contiguous();
        logit_grad_chunk<scalar_t>(z, t.data_ptr<int64_t>(), row_lse.data_ptr<scalar_t>(),
                                   g.data_ptr<scalar_t>(), start, label_smoothing, z_loss, vocab);
        if (need_h) gh.addmm_(z, weight.slice(0, start, stop).to(acc));
        if (need_w) grad_w.slice(0, start, stop).copy_(at::mm(z.t(), h));
        if (need_b) grad_b.slice(0, start, stop).copy_(z.sum(0));
      }
    });
    if (need_h) grad_h.index_copy_(0, rows, gh);
  }
  return {need_h ? grad_h.to(hidden.scalar_type()) : grad_h,
          need_w ? grad_w.to(weight.scalar_type()) : grad_w,
          need_b ? grad_b.to(bias->scalar_type()) : grad_b};
}

// Reduced loss Σ_n row_scale[n]·loss[n] with its gradients from one pass over the logits: rows
// are processed in chunks against the whole vocabulary, so every [chunk, V] block serves both
// the loss and the gradient (three matmuls in all, no recomputation). Used for "mean"/"sum".
//
// Per chunk the logits go through three passes: max (value and index), a row-local softmax
// (ATen's vectorised kernel: each row is read and written once while it sits in cache) and one
// scaling pass; the log-sum-exp comes from the softmax at the argmax, lse = max − log p_max, where
// p_max ≥ 1/V keeps the log well conditioned. The logits and probability blocks live in two
// buffers allocated once (a fresh 16 MiB block per chunk costs its page faults every time).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_linear_cross_entropy_reduced_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias,
                                       const at::Tensor& target, const at::Tensor& row_scale,
                                       int64_t ignore_index, double label_smoothing, double z_loss,
                                       std::array<bool, 3> output_mask) {
  check_inputs(hidden, weight, bias, target);
  TORCH_CHECK(row_scale.dim() == 1 && row_scale.size(0) == hidden.size(0),
              "fused_linear_cross_entropy_reduced (cpp): row_scale must be [N]");
  const bool need_h = output_mask[0], need_w = output_mask[1], need_b = output_mask[2] && bias.has_value();
  const bool need_grad = need_h || need_w || need_b;
  const auto acc = math_type(hidden.scalar_type());
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  at::Tensor total = at::zeros({}, hidden.options().dtype(acc));
  at::Tensor lse_out = at::zeros({n}, hidden.options().dtype(acc));
  at::Tensor correct = at::zeros({n}, hidden.options().dtype(at::kBool));
  at::Tensor grad_h = need_h ? at::zeros_like(hidden, hidden.options().dtype(acc)) : at::empty({0}, hidden.options());
  at::Tensor grad_w = need_w ? at::zeros_like(weight, weight.options().dtype(acc)) : at::empty({0}, hidden.options());
  at::Tensor grad_b = need_b ? at::zeros({vocab}, weight.options().dtype(acc)) : at::empty({0}, hidden.options());
  at::Tensor rows = target.ne(ignore_index).nonzero().squeeze(1);
  const int64_t nv = rows.size(0);
  if (nv > 0) {
    TORCH_CHECK(target.index_select(0, rows).ge(0).logical_and(target.index_select(0, rows).lt(vocab)).all().item<bool>(),
                "fused_linear_cross_entropy (cpp): target values must be in [0, ", vocab,
                ") or equal ignore_index=", ignore_index);
    const at::Tensor w = weight.to(acc);
    const at::Tensor wt = w.t();
    c10::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->to(acc);
    const int64_t budget = int64_t(16) << 20;  // per buffer
    const int64_t step = std::min<int64_t>(
        nv, std::max<int64_t>(16, budget / std::max<int64_t>(1, vocab * int64_t(at::elementSize(acc)))));
    at::Tensor z_buf = at::empty({step, vocab}, hidden.options().dtype(acc));
    at::Tensor p_buf = at::empty({step, vocab}, hidden.options().dtype(acc));
    for (int64_t start = 0; start < nv; start += step) {
      const int64_t k = std::min(step, nv - start);
      at::Tensor r = rows.slice(0, start, start + k);
      at::Tensor h = hidden.index_select(0, r).to(acc);
      at::Tensor t = target.index_select(0, r).to(at::kLong).unsqueeze(1);
      at::Tensor scale = row_scale.index_select(0, r).to(acc);
      at::Tensor z = z_buf.narrow(0, 0, k);
      if (b.has_value()) {
        at::addmm_out(z, *b, h, wt);
      } else {
        at::mm_out(z, h, wt);
      }
      auto [z_max, arg_max] = at::max(z, 1, /*keepdim=*/true);
      at::Tensor z_target = z.gather(1, t).squeeze(1);
      at::Tensor z_sum = label_smoothing > 0 ? z.sum(1) : at::Tensor();
      at::Tensor p = p_buf.narrow(0, 0, k);
      at::_softmax_out(p, z, 1, /*half_to_float=*/false);
      at::Tensor lse = (z_max - p.gather(1, arg_max).log()).squeeze(1);
      at::Tensor loss = lse - (1.0 - label_smoothing) * z_target;
      if (label_smoothing > 0) loss = loss - (label_smoothing / double(vocab)) * z_sum;
      if (z_loss > 0) loss = loss + z_loss * lse * lse;
      total.add_((scale * loss).sum());
      lse_out.index_copy_(0, r, lse);
      correct.index_copy_(0, r, arg_max.squeeze(1).eq(t.squeeze(1)));
      if (need_grad) {
        // dz = scale·(softmax·(1 + 2·z_loss·lse) − ε/V − (1−ε)·onehot), in place on p
        at::Tensor coef = z_loss > 0 ? scale * (1.0 + 2.0 * z_loss * lse) : scale;
        p.mul_(coef.unsqueeze(1));
        if (label_smoothing > 0) p.sub_((scale * (label_smoothing / double(vocab))).unsqueeze(1));
        p.scatter_add_(1, t, (-(1.0 - label_smoothing) * scale).unsqueeze(1));
        if (need_h) grad_h.index_copy_(0, r, at::mm(p, w));
        if (need_w) grad_w.addmm_(p.t(), h);
        if (need_b) grad_b.add_(p.sum(0));
      }
    }
  }
  return {total, lse_out, correct,
          need_h ? grad_h.to(hidden.scalar_type()) : grad_h,
          need_w ? grad_w.to(weight.scalar_type()) : grad_w,
          need_b ? grad_b.to(bias->scalar_type()) : grad_b};
}

TORCH_LIBRARY_FRAGMENT(unigen, m) {
  m.def(
      "fused_linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
      "int ignore_index, float label_smoothing, float z_loss) -> (Tensor, Tensor, Tensor)");
  m.def(
      "fused_linear_cross_entropy_backward(Tensor grad_rows, Tensor hidden, Tensor weight, "
      "Tensor? bias, Tensor target, Tensor lse, int ignore_index, float label_smoothing, "
      "float z_loss, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "fused_linear_cross_entropy_reduced(Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor target, Tensor row_scale, int ignore_index, float label_smoothing, float z_loss, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(unigen, CPU, m) {
  m.impl("fused_linear_cross_entropy", &fused_linear_cross_entropy_cpu);
  m.impl("fused_linear_cross_entropy_backward", &fused_linear_cross_entropy_backward_cpu);
  m.impl("fused_linear_cross_entropy_reduced", &fused_linear_cross_entropy_reduced_cpu);
}

}  // namespace unigen
