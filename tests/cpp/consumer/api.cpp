#include <ATen/ATen.h>
#include <attnzoo/attnzoo.h>

#include <iostream>

int main() {
  at::manual_seed(0);
  auto q = at::randn({1, 2, 16, 8}), k = at::randn({1, 2, 16, 8}), v = at::randn({1, 2, 16, 8});
  auto out = attnzoo::ops::attention(q, k, v, attnzoo::ops::AttentionOptions().causal(true));
  auto s = at::matmul(q, k.transpose(-1, -2)) / std::sqrt(8.0);
  s = s.masked_fill(at::ones({16, 16}, at::kBool).triu(1), -INFINITY);
  const double err = (out - at::matmul(at::softmax(s, -1), v)).abs().max().item<double>();
  std::cout << "api max_err=" << err << " isa=" << attnzoo::ops::engine_isa() << "\n";
  return err < 1e-5 ? 0 : 1;
}
