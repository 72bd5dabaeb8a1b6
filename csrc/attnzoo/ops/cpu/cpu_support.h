#pragma once
// What the CPU kernel files share (not installed): the engine build chosen for
// this CPU and a parallel loop over engine work items.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "attnzoo/ops/cpu/blas.h"
#include "attnzoo/ops/cpu/engine_api.h"

namespace attnzoo::cpu {

// The engine build for this CPU: the same choice ATen makes for its own
// kernels, so ATEN_CPU_CAPABILITY=default|avx2|avx512 steers both.
const EngineTable& selected_engine();

// at::empty for a kernel's output or gradient. From 32 MiB up glibc maps
// every allocation fresh (its dynamic mmap threshold stops there), and the
// first touch then faults it in 4 KiB pages: 7 ms for 32 MiB here, against
// 0.1 ms for a 16 MiB buffer the heap hands back. Such buffers are asked for
// transparent huge pages (madvise, before any write), which cuts that to
// 2.4 ms. The same as torch's opt-in THP_MEM_ALLOC_ENABLE=1, for our buffers
// only; ATTNZOO_HUGE_PAGES=0 turns it off.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

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
