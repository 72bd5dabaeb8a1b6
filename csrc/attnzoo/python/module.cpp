// attnzoo._C: importing it loads libattnzoo, whose static initialisers
// register the torch.ops.attnzoo.* operators. Model bindings join it later.
#include <pybind11/pybind11.h>

#include "attnzoo/attnzoo.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "attnzoo C++ extension";
  m.attr("__torch_ops_loaded__") = attnzoo::link_anchor();
  m.def("engine_isa", &attnzoo::ops::engine_isa,
        "Instruction set of the attention engine build chosen for this CPU");
}
