#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>

// Calls attnzoo::attention through the boxed dispatcher, filling every
// argument after q, k, v with its schema default (so added keyword
// arguments do not break it).
int main() {
  auto handle = c10::Dispatcher::singleton().findSchema({"attnzoo::attention", ""});
  if (!handle) {
    std::cout << "attnzoo::attention is not registered: libattnzoo was dropped at link time\n";
    return 1;
  }
  auto q = at::randn({1, 2, 8, 4});
  torch::jit::Stack stack{q, q, q};
  const auto& args = handle->schema().arguments();
  for (size_t i = 3; i < args.size(); ++i) stack.emplace_back(*args[i].default_value());
  handle->callBoxed(stack);
  const at::Tensor out = stack.at(0).toTensor();
  auto ref = at::matmul(at::softmax(at::matmul(q, q.transpose(-1, -2)) / 2.0, -1), q);
  const double err = (out - ref).abs().max().item<double>();
  std::cout << "dispatcher max_err=" << err << "\n";
  return err < 1e-5 ? 0 : 1;
}
