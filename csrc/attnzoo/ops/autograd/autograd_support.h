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

}  // namespace attnzoo::ops::detail
