#pragma once
// Everything attnzoo offers to C++ programs: #include <attnzoo/attnzoo.h>
#include "attnzoo/models/models.h"  // also models/config.h, nn/modules.h, io/safetensors.h
#include "attnzoo/ops/attention.h"
#include "attnzoo/ops/attention_variants.h"
#include "attnzoo/ops/layouts.h"

namespace attnzoo {
// Referencing this from a program keeps the library (and so its static op
// registrations) linked even under -Wl,--as-needed; the installed CMake
// package also links it with --no-as-needed.
int link_anchor();
}  // namespace attnzoo
