#pragma once
// What the CPU kernel files share (not installed): the engine build chosen for
// this CPU and a parallel loop over engine work items.
#include <ATen/Parallel.h>

#include "attnzoo/ops/cpu/blas.h"
#include "attnzoo/ops/cpu/engine_api.h"

namespace attnzoo::cpu {

// The engine build for this CPU: the same choice ATen makes for its own
// kernels, so ATEN_CPU_CAPABILITY=default|avx2|avx512 steers both.
const EngineTable& selected_engine();

// Runs an engine range function over work items [0, items) on ATen's
// threads, with BLAS kept to the calling thread inside each.
template <class Args>
void run_parallel(int64_t items, const Args& a, void (*fn)(const Args&, int64_t, int64_t)) {
  if (items <= 0) return;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    SingleThreadedBlas single_threaded;
    fn(a, begin, end);
  });
}

}  // namespace attnzoo::cpu
