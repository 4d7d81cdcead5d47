// C++ test of unigen::fused_linear_cross_entropy through the dispatcher (libtorch only):
// loss and gradients against the materialised-logits formula written with ATen ops.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <tuple>

namespace {

int failures = 0;

void expect_close(const at::Tensor& a, const at::Tensor& b, double tol, const char* what) {
  const double err = (a - b).abs().max().item<double>();
  if (!(err <= tol)) {
    std::printf("FAIL %s: max abs error %.3e > %.1e\n", what, err, tol);
    ++failures;
  } else {
    std::printf("ok   %s (max abs error %.1e)\n", what, err);
  }
}

void run_case(int64_t n, int64_t d, int64_t v, double smoothing, double z_loss, double softcap = 0.0) {
  torch::manual_seed(0);
  auto opts = torch::TensorOptions().dtype(torch::kDouble);
  auto hidden = torch::randn({n, d}, opts);
  auto weight = torch::randn({v, d}, opts) / std::sqrt(double(d));
  auto bias = torch::randn({v}, opts) * 0.1;
  auto target = torch::randint(0, v, {n}, torch::kLong);
  target.index_put_({torch::arange(0, n, 4)}, -100);

  auto fwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("unigen::fused_linear_cross_entropy", "")
                 .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                     const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                     const at::Tensor&, int64_t, double, double, double)>();
  auto bwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("unigen::fused_linear_cross_entropy_backward", "")
                 .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                     const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
                     int64_t, double, double, double, std::array<bool, 3>)>();
  auto [rows, lse, correct] = fwd.call(hidden, weight, bias, target, -100, smoothing, z_loss, softcap);

  // reference with autograd on materialised logits
  auto h = hidden.clone().requires_grad_();
  auto w = weight.clone().requires_grad_();
  auto b = bias.clone().requires_grad_();
  auto logits = torch::nn::functional::linear(h, w, b);
  if (softcap > 0) logits = softcap * torch::tanh(logits / softcap);
  auto valid = target.ne(-100);
  auto ref_rows = torch::nn::functional::cross_entropy(
      logits, target,
      torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).label_smoothing(smoothing).reduction(torch::kNone));
  ref_rows = ref_rows + z_loss * torch::where(valid, logits.logsumexp(1).pow(2), torch::zeros_like(ref_rows));
  auto upstream = torch::randn({n}, opts);
  (ref_rows * upstream).sum().backward();

  auto [gh, gw, gb] = bwd.call(upstream, hidden, weight, bias, target, lse, -100, smoothing, z_loss, softcap,
                               std::array<bool, 3>{true, true, true});
  char name[128];
  std::snprintf(name, sizeof(name), "N=%lld D=%lld V=%lld eps=%.2f z=%.0e cap=%.1f", (long long)n,
                (long long)d, (long long)v, smoothing, z_loss, softcap);
  std::printf("case %s\n", name);
  expect_close(rows, ref_rows.detach(), 1e-10, "row losses");
  expect_close(gh, h.grad(), 1e-10, "grad hidden");
  expect_close(gw, w.grad(), 1e-10, "grad weight");
  expect_close(gb, b.grad(), 1e-10, "grad bias");
}

}  // namespace

int main() {
  run_case(1, 8, 33, 0.0, 0.0);
  run_case(37, 19, 5001, 0.1, 1e-3);  // V spans several vocabulary chunks
  run_case(64, 48, 257, 0.0, 1e-2);
  run_case(29, 16, 300, 0.1, 1e-3, 0.5);  // a soft-cap that saturates (Gemma 2 uses 30)
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
