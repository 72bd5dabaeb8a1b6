#pragma once
// What the autograd nodes need from torch's (internal) autograd headers, across
// torch versions. Up to torch 2.8 a torch::autograd::Node is owned by a
// std::shared_ptr (made with deleteNode, its owner found by shared_from_this);
// newer torch (2.15 is tested) owns nodes by c10::intrusive_ptr (node.h:
// make_intrusive, getptr). The nodes here use NodePtr, make_node and self_of
// and compile against both.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#if __has_include(<torch/csrc/autograd/node.h>)
#include <torch/csrc/autograd/node.h>
#define ATTNZOO_INTRUSIVE_AUTOGRAD_NODES 1
#endif

namespace attnzoo::ops::detail {

#if defined(ATTNZOO_INTRUSIVE_AUTOGRAD_NODES)
using NodePtr = c10::intrusive_ptr<torch::autograd::Node>;
template <class N, class... Args>
c10::intrusive_ptr<N> make_node(Args&&... args) {
  return c10::make_intrusive<N>(std::forward<Args>(args)...);
}
inline NodePtr self_of(torch::autograd::Node* node) { return node->getptr(); }
#else
using NodePtr = std::shared_ptr<torch::autograd::Node>;
template <class N, class... Args>
std::shared_ptr<N> make_node(Args&&... args) {
  return std::shared_ptr<N>(new N(std::forward<Args>(args)...), torch::autograd::deleteNode);
}
inline NodePtr self_of(torch::autograd::Node* node) { return node->shared_from_this(); }
#endif

// The nodes here implement reverse mode only: an input carrying a forward-mode
// tangent is refused with an error naming the op (and `when`, the case that
// lacks it, if only one does). Undefined inputs (absent options) are skipped.
inline void refuse_forward_ad(const char* op, c10::ArrayRef<at::Tensor> inputs, const char* when = "") {
  for (const auto& t : inputs)
    TORCH_CHECK_NOT_IMPLEMENTED(!t.defined() || !t._fw_grad(/*level=*/0).defined(), op,
                                ": forward-mode AD (torch.func.jvp, jacfwd, forward_ad) is not implemented",
                                when, "; use reverse mode (backward, torch.func.grad, vjp, jacrev)");
}

// The engine's backward is not differentiable itself. A node computes its
// gradients below autograd and returns them through this: under
// create_graph (grad mode on inside a backward) they are tied to an Error
// node over `inputs` (the tensors they depend on), so a second backward
// through them stops with an error naming the op instead of silently missing
// the second-order terms, as torch's once_differentiable does.
inline torch::autograd::variable_list once_differentiable(const char* op,
                                                          torch::autograd::variable_list grads,
                                                          const std::vector<at::Tensor>& inputs) {
  if (!torch::autograd::compute_requires_grad(inputs)) return grads;
  auto error = make_node<torch::autograd::Error>(
      std::string(op) +
          ": second derivatives (a backward through gradients made with create_graph=True) are not "
          "implemented",
      torch::autograd::collect_next_edges(inputs));
  torch::autograd::set_history(grads, error);
  return grads;
}

// The Autograd kernel of the ops that run below autograd (_attention_forward,
// _attention_backward, ...): the nodes call them with autograd off, and a
// backward through them, which torch.func's nested transforms would attempt
// (jacrev of grad), stops with "derivative for attnzoo::<op> is not
// implemented" instead of torch's default, a deprecation warning and a
// silently missing gradient.
inline torch::CppFunction not_differentiable() { return torch::autograd::autogradNotImplementedFallback(); }

}  // namespace attnzoo::ops::detail
