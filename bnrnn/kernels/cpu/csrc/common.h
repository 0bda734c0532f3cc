// common.h: what every part of the compiled loops uses: the headers, and the tensor names.
//
// Layout: every (B, F) matrix is row-major and contiguous; gates are [i, f, g, o] blocks of
// H columns each (G = 4H). A norm that is off is the identity map (scale 1, shift 0), so one
// code path serves the four placements. Statistics are per step in the working precision;
// sums over time (the gamma and beta gradients) accumulate in double.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include "small_gemm.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

}  // namespace
