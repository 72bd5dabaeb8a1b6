#pragma once
// What the autograd nodes need from torch's (internal) autograd headers, across
// torch versions. Up to torch 2.8 a torch::autograd::Node is owned by a
// std::shared_ptr (made with deleteNode, its owner found by shared_from_this);
// newer torch (2.15 is tested) owns nodes by c10::intrusive_ptr (node.h:
// make_intrusive, getptr). The nodes here use NodePtr, make_node and self_of
// and compile against both.
#include <torch/csrc/autograd/function.h>

#include <memory>

#if __has_include(<torch/csrc/autograd/node.h>)
#include <torch/csrc/autograd/node.h>
#define ATTNZOO_INTRUSIVE_AUTOGRAD_NODES 1
#endif

namespace attnzoo::ops::detail {

#if defined(ATTNZOO_INTRUSIVE_AUTOGRAD_NODES)
using NodePtr = c10::intrusive_ptr<torch::autograd::Node>;
template <class N>
c10::intrusive_ptr<N> make_node() {
  return c10::make_intrusive<N>();
}
inline NodePtr self_of(torch::autograd::Node* node) { return node->getptr(); }
#else
using NodePtr = std::shared_ptr<torch::autograd::Node>;
template <class N>
std::shared_ptr<N> make_node() {
  return std::shared_ptr<N>(new N(), torch::autograd::deleteNode);
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

}  // namespace attnzoo::ops::detail
