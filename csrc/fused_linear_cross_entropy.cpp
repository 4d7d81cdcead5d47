// CPU implementation of the fused linear + vocabulary cross-entropy (unigen._C).
//
// Mirrors the PyTorch reference in kernels/fused_linear_cross_entropy.py with bounded memory:
// rows are processed in chunks so that only a [rows, V] block of logits (and one of their
// softmax) exists at a time, ~16 MiB each; the matmuls go to ATen (BLAS) and the per-row work
// to ATen's vectorised, OpenMP-parallel kernels (row_chunk_pass below). Math is fp32 for
// fp16/bf16/fp32 inputs and fp64 for fp64 inputs, whatever autocast state the caller is in: every
// op excludes the autocast dispatch keys (the Python wrapper applies the autocast rule at entry).
// An optional logit soft-cap (Gemma 2's final_logit_softcapping) replaces the logits z by
// c·tanh(z/c) before the loss; its gradient factor is 1 − (z'/c)².

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

namespace unigen {
namespace {

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

void check_row_vector(const at::Tensor& x, int64_t n, const char* name) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == n, "fused_linear_cross_entropy (cpp): ", name,
              " must be [N] with N = ", n, ", got ", x.sizes());
}

// What one pass over the logits produced: per-row loss, lse and argmax-correctness (0 / false on
// ignored rows) and the gradients (math dtype, full size; empty when not asked for).
struct Pass {
  at::Tensor loss, lse, correct, grad_h, grad_w, grad_b;
};

// The one CPU algorithm behind the three ops. Rows with a target (ignored rows are dropped before
// any matmul) are processed in chunks against the whole vocabulary, so a [chunk, V] block of
// logits serves the loss and, when `row_grad` is defined, the gradients, each row's scaled by
// row_grad[row] (three matmuls in all). Per block the logits take three passes: max (value and
// index), ATen's row-local softmax into a second buffer (each row is read and written once while
// it sits in cache) and one scaling pass; the log-sum-exp comes from the softmax at the argmax,
// lse = max − log p_max, where p_max ≥ 1/V keeps the log well conditioned. The logits and the
// probabilities live in two 16 MiB buffers allocated once (a fresh block per chunk would cost
// its page faults every time). Math in fp32 for fp16/bf16/fp32 inputs, fp64 for fp64.
Pass row_chunk_pass(const at::Tensor& hidden, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                    const at::Tensor& row_grad, int64_t ignore_index, double label_smoothing,
                    double z_loss, double softcap, bool need_h, bool need_w, bool need_b) {
  // The matmuls below must run in the math dtype: under autocast they would be re-cast to
  // bf16/fp16 and their blocks would no longer fit the fp32 outputs.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(softcap >= 0, "fused_linear_cross_entropy (cpp): softcap must be >= 0, got ", softcap);
  const auto acc = math_type(hidden.scalar_type());
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  need_b = need_b && bias.has_value();
  const bool need_grad = row_grad.defined() && (need_h || need_w || need_b);
  Pass out;
  out.loss = at::zeros({n}, hidden.options().dtype(acc));
  out.lse = at::zeros({n}, hidden.options().dtype(acc));
  out.correct = at::zeros({n}, hidden.options().dtype(at::kBool));
  out.grad_h = need_grad && need_h ? at::zeros_like(hidden, hidden.options().dtype(acc)) : at::Tensor();
  out.grad_w = need_grad && need_w ? at::zeros_like(weight, weight.options().dtype(acc)) : at::Tensor();
  out.grad_b = need_grad && need_b ? at::zeros({vocab}, weight.options().dtype(acc)) : at::Tensor();
  const at::Tensor rows = target.ne(ignore_index).nonzero().squeeze(1);
  const int64_t nv = rows.size(0);
  if (nv == 0) return out;
  const at::Tensor valid_targets = target.index_select(0, rows);
  TORCH_CHECK(valid_targets.ge(0).logical_and(valid_targets.lt(vocab)).all().item<bool>(),
              "fused_linear_cross_entropy (cpp): target values must be in [0, ", vocab,
              ") or equal ignore_index=", ignore_index);
  const at::Tensor w = weight.to(acc);
  const at::Tensor wt = w.t();
  c10::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(acc);
  const int64_t budget = int64_t(16) << 20;  // bytes per buffer
  const int64_t step = std::min<int64_t>(
      nv, std::max<int64_t>(16, budget / std::max<int64_t>(1, vocab * int64_t(at::elementSize(acc)))));
  at::Tensor z_buf = at::empty({step, vocab}, hidden.options().dtype(acc));
  at::Tensor p_buf = at::empty({step, vocab}, hidden.options().dtype(acc));
  for (int64_t start = 0; start < nv; start += step) {
    const int64_t k = std::min(step, nv - start);
    const at::Tensor r = rows.slice(0, start, start + k);
    const at::Tensor h = hidden.index_select(0, r).to(acc);
    const at::Tensor t = target.index_select(0, r).to(at::kLong).unsqueeze(1);
    at::Tensor z = z_buf.narrow(0, 0, k);
    if (b.has_value()) {
      at::addmm_out(z, *b, h, wt);
    } else {
      at::mm_out(z, h, wt);
    }
    // soft-cap in place, the same three steps as the transformers models (divide, tanh, scale)
    if (softcap > 0) z.div_(softcap).tanh_().mul_(softcap);
    auto [z_max, arg_max] = at::max(z, 1, /*keepdim=*/true);
    const at::Tensor z_target = z.gather(1, t).squeeze(1);
    at::Tensor p = p_buf.narrow(0, 0, k);
    at::_softmax_out(p, z, 1, /*half_to_float=*/false);
    const at::Tensor lse = (z_max - p.gather(1, arg_max).log()).squeeze(1);
    at::Tensor loss = lse - (1.0 - label_smoothing) * z_target;
    if (label_smoothing > 0) loss = loss - (label_smoothing / double(vocab)) * z.sum(1);
    if (z_loss > 0) loss = loss + z_loss * lse * lse;
    out.loss.index_copy_(0, r, loss);
    out.lse.index_copy_(0, r, lse);
    out.correct.index_copy_(0, r, arg_max.squeeze(1).eq(t.squeeze(1)));
    if (!need_grad) continue;
    // dz = g·(softmax·(1 + 2·z_loss·lse) − ε/V − (1−ε)·onehot), in place on p
    const at::Tensor g = row_grad.index_select(0, r).to(acc);
    p.mul_((z_loss > 0 ? g * (1.0 + 2.0 * z_loss * lse) : g).unsqueeze(1));
    if (label_smoothing > 0) p.sub_((g * (label_smoothing / double(vocab))).unsqueeze(1));
    p.scatter_add_(1, t, (-(1.0 - label_smoothing) * g).unsqueeze(1));
    // chain rule through the cap: ∂z'/∂z = 1 − (z'/c)², formed in place on the capped logits
    if (softcap > 0) p.mul_(z.div_(softcap).square_().neg_().add_(1.0));
    if (need_h) out.grad_h.index_copy_(0, r, at::mm(p, w));
    if (need_w) out.grad_w.addmm_(p.t(), h);
    if (need_b) out.grad_b.add_(p.sum(0));
  }
  return out;
}

// A gradient in its input's dtype, or an empty tensor where none was asked for.
at::Tensor grad_or_empty(const at::Tensor& grad, const at::Tensor& like) {
  return grad.defined() ? grad.to(like.scalar_type()) : at::empty({0}, like.options());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_cross_entropy_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t ignore_index, double label_smoothing, double z_loss,
    double softcap) {
  check_inputs(hidden, weight, bias, target);
  Pass pass = row_chunk_pass(hidden, weight, bias, target, at::Tensor(), ignore_index,
                             label_smoothing, z_loss, softcap, false, false, false);
  return {pass.loss, pass.lse, pass.correct};
}

// The backward of the per-row losses: recomputes the logits of each row chunk (and their lse,
// which equals the forward's `lse`; the argument keeps the schema of the Python path).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_cross_entropy_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& target, const at::Tensor& lse,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
    std::array<bool, 3> output_mask) {
  check_inputs(hidden, weight, bias, target);
  check_row_vector(grad_rows, hidden.size(0), "grad_rows");
  check_row_vector(lse, hidden.size(0), "lse");
  Pass pass = row_chunk_pass(hidden, weight, bias, target, grad_rows, ignore_index,
                             label_smoothing, z_loss, softcap, output_mask[0], output_mask[1], output_mask[2]);
  return {grad_or_empty(pass.grad_h, hidden), grad_or_empty(pass.grad_w, weight),
          bias.has_value() ? grad_or_empty(pass.grad_b, *bias) : at::empty({0}, hidden.options())};
}

// Reduced loss Σ_n row_scale[n]·loss[n] with its gradients from the same pass (the gradients of
// "mean"/"sum" cost no recomputation).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_linear_cross_entropy_reduced_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias,
                                       const at::Tensor& target, const at::Tensor& row_scale,
                                       int64_t ignore_index, double label_smoothing, double z_loss,
                                       double softcap, std::array<bool, 3> output_mask) {
  check_inputs(hidden, weight, bias, target);
  check_row_vector(row_scale, hidden.size(0), "row_scale");
  Pass pass = row_chunk_pass(hidden, weight, bias, target, row_scale, ignore_index,
                             label_smoothing, z_loss, softcap, output_mask[0], output_mask[1], output_mask[2]);
  // ignored rows carry no loss, whatever their scale holds
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  at::Tensor total = at::where(target.ne(ignore_index), row_scale.to(pass.loss.scalar_type()) * pass.loss,
                               at::zeros({}, pass.loss.options())).sum();
  return {total, pass.lse, pass.correct, grad_or_empty(pass.grad_h, hidden),
          grad_or_empty(pass.grad_w, weight),
          bias.has_value() ? grad_or_empty(pass.grad_b, *bias) : at::empty({0}, hidden.options())};
}

TORCH_LIBRARY_FRAGMENT(unigen, m) {
  m.def(
      "fused_linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, "
      "int ignore_index, float label_smoothing, float z_loss, float softcap) -> (Tensor, Tensor, Tensor)");
  m.def(
      "fused_linear_cross_entropy_backward(Tensor grad_rows, Tensor hidden, Tensor weight, "
      "Tensor? bias, Tensor target, Tensor lse, int ignore_index, float label_smoothing, "
      "float z_loss, float softcap, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "fused_linear_cross_entropy_reduced(Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor target, Tensor row_scale, int ignore_index, float label_smoothing, float z_loss, "
      "float softcap, bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(unigen, CPU, m) {
  m.impl("fused_linear_cross_entropy", &fused_linear_cross_entropy_cpu);
  m.impl("fused_linear_cross_entropy_backward", &fused_linear_cross_entropy_backward_cpu);
  m.impl("fused_linear_cross_entropy_reduced", &fused_linear_cross_entropy_reduced_cpu);
}

}  // namespace unigen
