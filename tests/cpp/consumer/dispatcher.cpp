#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <iostream>

int main() {
  auto handle = c10::Dispatcher::singleton().findSchema({"attnzoo::attention", ""});
  if (!handle) {
    std::cout << "attnzoo::attention is not registered: libattnzoo was dropped at link time\n";
    return 1;
  }
  auto op = handle->typed<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, bool, at::OptionalIntArrayRef,
      const std::optional<at::Tensor>&, double, std::optional<double>)>();
  auto q = at::randn({1, 2, 8, 4});
  auto [out, lse] = op.call(q, q, q, std::nullopt, std::nullopt, false, std::nullopt, std::nullopt,
                            0.0, std::nullopt);
  auto ref = at::matmul(at::softmax(at::matmul(q, q.transpose(-1, -2)) / 2.0, -1), q);
  const double err = (out - ref).abs().max().item<double>();
  std::cout << "dispatcher max_err=" << err << "\n";
  return err < 1e-5 ? 0 : 1;
}
