"""Decode attention that reads the KV pool's pages in place, on CPU: a small C++ kernel.

One query token per row (the decode rows of a step): for each row (split over torch's
threads; by KV heads too when there are fewer rows than threads), the kernel walks the row's
block table up to its length, page by page, with an online softmax (per page: every head's
scores, one rescale per head, the weights by a vectorizable exponential, then the values).
A page holds every KV head of a token side by side, so it is read front to back, once, for
all the row's heads, where it lives (a head-at-a-time walk reads 128 of every 512 bytes and
ran 3x slower from memory); nothing is gathered, no mask is built, and a slot past a row's
length is never read (whatever it holds). Once a page is in cache, the common head sizes (32,
64, 80, 96, 128, compiled unrolled) are summed head by head over it: scores four tokens at a
time (without grouped heads), values with the head's sums in registers (1.5-1.6x at head size
32 on this machine's CPU; the same at 32/8 heads of 128).

The kernel is compiled with the machine's C++ compiler the first time it is needed (about
20-40 s, cached by torch under ``~/.cache/torch_extensions``); ``available()`` says whether
it could be. Float32, float16 and bfloat16 pools (accumulation in float32).
"""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger("vlm_engine.kv")

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

// e^x for x <= 0 as 2^(x log2 e), the fraction by a degree-6 polynomial fitted
// to 2^f on [0, 1) (relative error 1e-7, float's own), the integer part in the exponent bits.
static inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.4426950408889634f;
  const int32_t whole = static_cast<int32_t>(t) - (t < static_cast<float>(static_cast<int32_t>(t)) ? 1 : 0);
  const float f = t - static_cast<float>(whole);
  float p = 0.000218712622881867f;
  p = p * f + 0.001238241558894515f;
  p = p * f + 0.009686185978353024f;
  p = p * f + 0.055478911846876144f;
  p = p * f + 0.24023109674453735f;
  p = p * f + 0.693146824836731f;
  p = p * f + 1.0f;
  union { int32_t i; float f; } scale_bits;
  scale_bits.i = (whole + 127) << 23;
  return p * scale_bits.f;
}

// D > 0: the head size known when compiled (the loops over it unroll into a few vector
// operations; a dot product of 32 floats is otherwise mostly loop overhead); D == 0: any size.
template <typename T, int D>
static void decode_rows(const float* q, const T* k_pool, const T* v_pool, const int64_t* table,
                        const int64_t* lengths, float* out, int64_t rows, int64_t heads, int64_t kv_heads,
                        int64_t head_size, int64_t page, int64_t width, float scale, int64_t splits) {
  const int64_t dim = D > 0 ? D : head_size;
  // One work item: a row's heads that share the KV heads [kv_first, kv_first + kv_count). A slot
  // holds every KV head of a token side by side, so a page is one contiguous run of memory,
  // read front to back (as the prefetcher likes) once for all the item's heads.
  const int64_t group = heads / kv_heads;
  const int64_t per_split = (kv_heads + splits - 1) / splits;
  const int64_t stride = kv_heads * dim;  // floats between one token's slot and the next
  at::parallel_for(0, rows * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(heads * dim), scores(heads * page), best(heads), total(heads);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / splits;
      const int64_t kv_first = (item % splits) * per_split;
      const int64_t kv_count = std::min(per_split, kv_heads - kv_first);
      if (kv_count <= 0) continue;
      const int64_t h_first = kv_first * group, h_count = kv_count * group;
      const int64_t length = lengths[r];
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(best.begin(), best.end(), -std::numeric_limits<float>::infinity());
      std::fill(total.begin(), total.end(), 0.0f);
      for (int64_t first = 0; first < length; first += page) {
        const int64_t count = std::min(page, length - first);
        const T* k_page = k_pool + table[r * width + first / page] * page * stride;
        const T* v_page = v_pool + table[r * width + first / page] * page * stride;
        if (D > 0 && group == 1) {  // scores, head by head, four tokens at a time (four independent
          // sums); with grouped heads, token by token below reads each key once for the group
          for (int64_t h = 0; h < h_count; ++h) {
            const int64_t head = h_first + h;
            const float* qh = q + (r * heads + head) * D;
            const T* k_head = k_page + (head / group) * D;
            float* w = scores.data() + h * page;
            int64_t j = 0;
            for (; j + 4 <= count; j += 4) {
              const T* k0 = k_head + j * stride;
              const T *k1 = k0 + stride, *k2 = k1 + stride, *k3 = k2 + stride;
              float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
              for (int64_t d = 0; d < D; ++d) {
                const float x = qh[d];
                s0 += x * static_cast<float>(k0[d]);
                s1 += x * static_cast<float>(k1[d]);
                s2 += x * static_cast<float>(k2[d]);
                s3 += x * static_cast<float>(k3[d]);
              }
              w[j] = s0 * scale, w[j + 1] = s1 * scale, w[j + 2] = s2 * scale, w[j + 3] = s3 * scale;
            }
            for (; j < count; ++j) {
              const T* kh = k_head + j * stride;
              float s = 0.0f;
#pragma omp simd reduction(+ : s)
              for (int64_t d = 0; d < D; ++d) s += qh[d] * static_cast<float>(kh[d]);
              w[j] = s * scale;
            }
          }
        } else {
          for (int64_t j = 0; j < count; ++j) {  // scores, token by token, every head of the item
            const T* k = k_page + j * stride;
            for (int64_t h = 0; h < h_count; ++h) {
              const int64_t head = h_first + h;
              const float* qh = q + (r * heads + head) * dim;
              const T* kh = k + (head / group) * dim;
              float s = 0.0f;
#pragma omp simd reduction(+ : s)
              for (int64_t d = 0; d < dim; ++d) s += qh[d] * static_cast<float>(kh[d]);
              scores[h * page + j] = s * scale;
            }
          }
        }
        for (int64_t h = 0; h < h_count; ++h) {  // one rescale per head and page, then its weights
          float* w = scores.data() + h * page;
          float block_best = -std::numeric_limits<float>::infinity();
          for (int64_t j = 0; j < count; ++j) block_best = w[j] > block_best ? w[j] : block_best;
          if (block_best > best[h]) {
            const float shrink = exp_nonpositive(best[h] - block_best);
            total[h] *= shrink;
            float* a = acc.data() + h * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) a[d] *= shrink;
            best[h] = block_best;
          }
          const float top = best[h];
          float block_total = 0.0f;
#pragma omp simd reduction(+ : block_total)
          for (int64_t j = 0; j < count; ++j) {
            w[j] = exp_nonpositive(w[j] - top);
            block_total += w[j];
          }
          total[h] += block_total;
        }
        if constexpr (D > 0) {  // values, head by head over the page (in cache by now): the
          // head's sums stay in registers for the page's tokens
          for (int64_t h = 0; h < h_count; ++h) {
            const T* v_head = v_page + ((h_first + h) / group) * dim;
            const float* w = scores.data() + h * page;
            float* a = acc.data() + h * dim;
            float sums[D];
            for (int64_t d = 0; d < D; ++d) sums[d] = a[d];
            for (int64_t j = 0; j < count; ++j) {
              const T* vh = v_head + j * stride;
              const float p = w[j];
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) sums[d] += p * static_cast<float>(vh[d]);
            }
            for (int64_t d = 0; d < D; ++d) a[d] = sums[d];
          }
        } else {
          for (int64_t j = 0; j < count; ++j) {  // values, token by token
            const T* v = v_page + j * stride;
            for (int64_t h = 0; h < h_count; ++h) {
              const T* vh = v + ((h_first + h) / group) * dim;
              const float p = scores[h * page + j];
              float* a = acc.data() + h * dim;
#pragma omp simd
              for (int64_t d = 0; d < dim; ++d) a[d] += p * static_cast<float>(vh[d]);
            }
          }
        }
      }
      for (int64_t h = 0; h < h_count; ++h) {
        float* o = out + (r * heads + h_first + h) * dim;
        const float inv = total[h] > 0.0f ? 1.0f / total[h] : 0.0f;
        for (int64_t d = 0; d < dim; ++d) o[d] = acc[h * dim + d] * inv;
      }
    }
  });
}

// The usual head sizes unrolled; any other through the general loops.
template <typename T>
static void decode_any_size(const float* q, const T* k_pool, const T* v_pool, const int64_t* table,
                            const int64_t* lengths, float* out, int64_t rows, int64_t heads, int64_t kv_heads,
                            int64_t dim, int64_t page, int64_t width, float scale, int64_t splits) {
  auto run = [&](auto size) {
    decode_rows<T, decltype(size)::value>(q, k_pool, v_pool, table, lengths, out, rows, heads, kv_heads, dim, page,
                                          width, scale, splits);
  };
  switch (dim) {
    case 32: return run(std::integral_constant<int, 32>{});
    case 64: return run(std::integral_constant<int, 64>{});
    case 80: return run(std::integral_constant<int, 80>{});
    case 96: return run(std::integral_constant<int, 96>{});
    case 128: return run(std::integral_constant<int, 128>{});
    default: return run(std::integral_constant<int, 0>{});
  }
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor table,
                           torch::Tensor lengths, double scale) {
  // q [rows, heads, dim]; pools [pages, page, kv_heads, dim]; table [rows, width]; lengths [rows]
  auto qf = q.to(torch::kFloat32).contiguous();
  auto t = table.to(torch::kInt64).contiguous();
  auto n = lengths.to(torch::kInt64).contiguous();
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous(), "the KV pool must be contiguous");
  const int64_t rows = qf.size(0), heads = qf.size(1), dim = qf.size(2);
  const int64_t page = k_pool.size(1), kv_heads = k_pool.size(2), width = t.size(1);
  auto out = torch::empty({rows, heads, dim}, qf.options());
  // rows split by KV heads only when there are fewer rows than threads to keep busy
  const int64_t threads = at::get_num_threads();
  const int64_t splits = rows >= threads ? 1 : std::min(kv_heads, (threads + rows - 1) / rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_pool.scalar_type(), "paged_decode", [&] {
    decode_any_size<scalar_t>(qf.data_ptr<float>(), k_pool.data_ptr<scalar_t>(), v_pool.data_ptr<scalar_t>(),
                              t.data_ptr<int64_t>(), n.data_ptr<int64_t>(), out.data_ptr<float>(), rows, heads,
                              kv_heads, dim, page, width, static_cast<float>(scale), splits);
  });
  return out.to(q.scalar_type());
}
"""

_lock = threading.Lock()
_module = None
_failed: str | None = None


def _load():
    global _module, _failed
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        from torch.utils.cpp_extension import load_inline

        try:
            log.info("loading the CPU paged-attention kernel (built with g++ once per machine, ~30 s; then cached)")
            _module = load_inline(
                name="vlm_paged_decode_v11",
                cpp_sources=SOURCE,
                functions=["paged_decode"],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
            )
        except Exception as exc:  # no compiler, no ninja: the gather path serves
            _failed = f"{type(exc).__name__}: {exc}"
            log.warning("the CPU paged-attention kernel could not be built (%s); attention gathers pages", _failed)
        return _module


def available() -> bool:
    """Whether the kernel is (or can be) built here."""
    return _load() is not None


def paged_decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    table: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``q`` ``[rows, heads, dim]`` against each row's first ``lengths[r]`` tokens in the pages
    ``table[r]`` of ``keys``/``values`` ``[pages, page_size, kv_heads, dim]``."""
    return _load().paged_decode(q, keys, values, table, lengths, scale)


if __name__ == "__main__":  # `make install` builds it once, so no model load waits for the compiler
    import time

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    built = available()
    outcome = "ready" if built else f"not built ({_failed}); decode attention will gather pages"
    print(f"CPU paged-attention kernel: {outcome} ({time.perf_counter() - started:.1f} s)")
