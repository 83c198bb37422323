// CPU kernels for the SAE steps that XLA:CPU runs poorly (see cpu_kernels.py).
//
// All are XLA FFI handlers, called from jitted code through jax.ffi.ffi_call. For TopK:
//
//   dictlearn_top_k          exact lax.top_k of (x + bias) along the last axis: same values, same
//                            indices, same tie order (lowest index first), same total order of
//                            floats (-0 < +0, NaN above +inf) as XLA's TopK.
//   dictlearn_sparse_backward
//                            the gradients of W_dec, W_enc (written transposed, [d, F]) and b_enc
//                            of a TopK SAE from its batch * k (token, latent) pairs (also serves
//                            the SAEs below: any set of active slots).
//
// For SAEs whose L0 varies per token (see dictlearn/sae/variable_l0.py):
//
//   dictlearn_select_above   per row, the columns whose ranking value is positive (up to a bound)
//   dictlearn_sparse_decode  sum of value * W_dec row over the nonzero slots of each token
//   dictlearn_pair_dots      g[b] . W_dec[idx] for the masked (token, slot) pairs
//
// Work is split over XLA's intra-op thread pool. Every output element is computed by exactly one
// thread in a fixed order, so results do not depend on the number of threads or on scheduling:
// runs are bit-reproducible, which exact resume relies on.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DICTLEARN_HAS_MXCSR 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---------------------------------------------------------------------------------------------
// Parallel loop over [0, n_tasks) on XLA's intra-op pool, deadlock-free.
//
// The caller takes tasks too and only ever waits for tasks a worker has already started, so it
// never blocks on a pool that is busy (e.g. with the other virtual devices' kernels). Workers
// inherit the caller's floating-point control word: XLA runs with denormals flushed, and a pool
// thread must round exactly as the calling thread does.
struct ParallelState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> running{0};
  std::mutex mutex;
  std::condition_variable done;
};

// The calling thread's floating-point control word (x86 MXCSR; elsewhere nothing), applied to a
// worker thread for as long as this object lives.
class ScopedFloatControl {
 public:
#ifdef DICTLEARN_HAS_MXCSR
  static unsigned int Current() { return _mm_getcsr(); }
  explicit ScopedFloatControl(unsigned int word) : saved_(_mm_getcsr()) { _mm_setcsr(word); }
  ~ScopedFloatControl() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#else
  static unsigned int Current() { return 0; }
  explicit ScopedFloatControl(unsigned int) {}
#endif
};

template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n_tasks, Body body) {
  if (n_tasks <= 0) return;
  // The caller works too, so num_threads() - 1 helpers keep every pool thread busy.
  int64_t n_workers = std::min<int64_t>(pool.num_threads() - 1, n_tasks - 1);
  if (n_workers <= 0) {
    for (int64_t i = 0; i < n_tasks; ++i) body(i);
    return;
  }
  const unsigned int float_control = ScopedFloatControl::Current();
  auto state = std::make_shared<ParallelState>();
  // `body` lives on the caller's stack: a worker touches it only while counted in `running`,
  // and the caller returns only once every task is claimed and `running` is back to 0.
  Body* body_ptr = &body;
  for (int64_t w = 0; w < n_workers; ++w) {
    pool.Schedule([state, body_ptr, n_tasks, float_control]() {
      state->running.fetch_add(1);
      // Claim after registering as running, so the caller cannot miss this worker.
      int64_t i = state->next.fetch_add(1);
      if (i < n_tasks) {
        ScopedFloatControl control(float_control);
        for (; i < n_tasks; i = state->next.fetch_add(1)) (*body_ptr)(i);
      }
      if (state->running.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(state->mutex);
        state->done.notify_all();
      }
    });
  }
  for (int64_t i = state->next.fetch_add(1); i < n_tasks; i = state->next.fetch_add(1)) body(i);
  // Every task is claimed. A worker that registers from now on claims nothing and never
  // touches `body`; wait only for those still inside it.
  std::unique_lock<std::mutex> lock(state->mutex);
  state->done.wait(lock, [&] { return state->running.load() == 0; });
}

// ---------------------------------------------------------------------------------------------
// Top-k.

// float -> int32 in the order of XLA's TopK comparator (a total order: -0 < +0).
inline int32_t OrderKey(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits < 0 ? bits ^ 0x7FFFFFFF : bits;
}

// A candidate ranks above another if its key is larger, or equal with a lower index.
struct Candidate {
  int32_t key;
  int32_t index;
  float value;
};

// A function object, not a function: std::partial_sort inlines it, where through a function
// pointer every comparison was an out-of-line call (seen in perf).
constexpr auto Better = [](const Candidate& a, const Candidate& b) {
  return a.key > b.key || (a.key == b.key && a.index < b.index);
};

constexpr int64_t kLanes = 16;

// Portable SIMD (GCC/Clang vector extensions): one AVX-512 register, two AVX2 ones, ...
typedef float FloatLanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IntLanes __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline IntLanes OrderKeys(FloatLanes values) {
  IntLanes bits;
  std::memcpy(&bits, &values, sizeof(bits));
  return bits < 0 ? bits ^ 0x7FFFFFFF : bits;
}

template <bool kBias>
inline float Biased(const float* x, const float* bias, int64_t i) {
  if constexpr (kBias) {
    return x[i] + bias[i];
  } else {
    return x[i];
  }
}

inline IntLanes Max(IntLanes a, IntLanes b) { return a > b ? a : b; }

inline bool AnyAtLeast(IntLanes keys, int32_t threshold) {
  // Via a mask register where there is one: spilling the comparison to memory and reading it
  // back as words stalls on store forwarding and cost most of the scan.
#if defined(__AVX512F__)
  __m512i k;
  std::memcpy(&k, &keys, sizeof(k));
  return _mm512_cmpge_epi32_mask(k, _mm512_set1_epi32(threshold)) != 0;
#elif defined(__AVX2__)
  if (threshold == INT32_MIN) return true;  // and t - 1 below would overflow
  __m256i halves[2];
  std::memcpy(halves, &keys, sizeof(halves));
  const __m256i below = _mm256_set1_epi32(threshold - 1);  // keys >= t  <=>  keys > t - 1
  return _mm256_movemask_epi8(_mm256_or_si256(_mm256_cmpgt_epi32(halves[0], below),
                                              _mm256_cmpgt_epi32(halves[1], below))) != 0;
#else
  for (int64_t j = 0; j < kLanes; ++j)
    if (keys[j] >= threshold) return true;
  return false;
#endif
}

template <bool kBias>
inline FloatLanes LoadLanes(const float* x, const float* bias, int64_t i) {
  FloatLanes v;
  std::memcpy(&v, x + i, sizeof(v));
  if constexpr (kBias) {
    FloatLanes b;
    std::memcpy(&b, bias + i, sizeof(b));
    v += b;
  }
  return v;
}

// Largest key in [begin, end).
template <bool kBias>
int32_t MaxKey(const float* x, const float* bias, int64_t begin, int64_t end) {
  int32_t best = INT32_MIN;
  int64_t i = begin;
  if (end - begin >= kLanes) {
    IntLanes lanes = OrderKeys(LoadLanes<kBias>(x, bias, i));
    for (i += kLanes; i + kLanes <= end; i += kLanes)
      lanes = Max(lanes, OrderKeys(LoadLanes<kBias>(x, bias, i)));
    for (int64_t j = 0; j < kLanes; ++j) best = std::max(best, lanes[j]);
  }
  for (; i < end; ++i) best = std::max(best, OrderKey(Biased<kBias>(x, bias, i)));
  return best;
}

// Top-k of one row in two passes over it (the second one from cache):
// 1. Split the row into k chunks. Each chunk's maximum is a distinct element, so the smallest
//    of them, `floor`, is at most the k-th largest: nothing with a smaller key can win.
// 2. Collect every element with key >= floor (in index order; typically a few k of them),
//    then take the best k of those with (key descending, index ascending): XLA's order.
template <bool kBias>
void TopKRow(const float* x, const float* bias, int64_t n, int64_t k, float* values,
             int32_t* indices, Candidate* candidates) {
  const int64_t chunk = n / k;
  int32_t floor = INT32_MAX;
  for (int64_t c = 0; c < k; ++c) {
    const int64_t end = c + 1 == k ? n : (c + 1) * chunk;
    floor = std::min(floor, MaxKey<kBias>(x, bias, c * chunk, end));
  }
  int64_t count = 0;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const FloatLanes v = LoadLanes<kBias>(x, bias, i);
    const IntLanes keys = OrderKeys(v);
    if (!AnyAtLeast(keys, floor)) continue;
    for (int64_t j = 0; j < kLanes; ++j)
      if (keys[j] >= floor) candidates[count++] = {keys[j], static_cast<int32_t>(i + j), v[j]};
  }
  for (; i < n; ++i) {
    const float v = Biased<kBias>(x, bias, i);
    const int32_t key = OrderKey(v);
    if (key >= floor) candidates[count++] = {key, static_cast<int32_t>(i), v};
  }
  std::partial_sort(candidates, candidates + k, candidates + count, Better);
  for (int64_t j = 0; j < k; ++j) {
    values[j] = candidates[j].value;
    indices[j] = candidates[j].index;
  }
}

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> bias,
                    ffi::ResultBuffer<ffi::F32> values, ffi::ResultBuffer<ffi::S32> indices,
                    int64_t k, bool has_bias) {
  auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("dictlearn_top_k: x must be 2-D");
  const int64_t rows = dims[0], n = dims[1];
  if (k < 1 || k > n) return ffi::Error::InvalidArgument("dictlearn_top_k: need 1 <= k <= n");
  if (n > INT32_MAX) return ffi::Error::InvalidArgument("dictlearn_top_k: row too long");
  if (has_bias && bias.element_count() != n)
    return ffi::Error::InvalidArgument("dictlearn_top_k: bias must have one entry per column");
  const float* x_data = x.typed_data();
  const float* bias_data = has_bias ? bias.typed_data() : nullptr;
  float* out_values = values->typed_data();
  int32_t* out_indices = indices->typed_data();
  constexpr int64_t kRowsPerTask = 16;
  const int64_t n_tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  ParallelFor(pool, n_tasks, [&](int64_t task) {
    std::vector<Candidate> candidates(n);
    const int64_t end = std::min(rows, (task + 1) * kRowsPerTask);
    for (int64_t r = task * kRowsPerTask; r < end; ++r) {
      if (bias_data) {
        TopKRow<true>(x_data + r * n, bias_data, n, k, out_values + r * k, out_indices + r * k,
                      candidates.data());
      } else {
        TopKRow<false>(x_data + r * n, nullptr, n, k, out_values + r * k, out_indices + r * k,
                       candidates.data());
      }
    }
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// Sparse backward of a TopK SAE.

// sum_j a[j] * b[j] with independent partial sums, so it vectorises without -ffast-math.
inline float Dot(const float* a, const float* b, int64_t n) {
  float partial[kLanes] = {0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) partial[l] += a[j + l] * b[j + l];
  float total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += partial[l];
  for (; j < n; ++j) total += a[j] * b[j];
  return total;
}

inline void Axpy(float scale, const float* x, float* y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += scale * x[j];
}

ffi::Error SparseBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g_partial,
                              ffi::Buffer<ffi::F32> centered, ffi::Buffer<ffi::F32> w_dec,
                              ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::F32> g_values,
                              ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::PRED> active,
                              ffi::ResultBuffer<ffi::F32> grad_w_dec,
                              ffi::ResultBuffer<ffi::F32> grad_w_enc,
                              ffi::ResultBuffer<ffi::F32> grad_b_enc) {
  const int64_t batch = g_partial.dimensions()[0], d = g_partial.dimensions()[1];
  const int64_t n_features = w_dec.dimensions()[0], k = indices.dimensions()[1];
  const float* g = g_partial.typed_data();
  const float* c = centered.typed_data();
  const float* w = w_dec.typed_data();
  const float* value = values.typed_data();
  const float* g_value = g_values.typed_data();
  const int32_t* index = indices.typed_data();
  const bool* is_active = active.typed_data();

  // Counting sort of the active pairs by latent; within a latent, by token (scan order).
  std::vector<int64_t> start(n_features + 1, 0);
  for (int64_t p = 0; p < batch * k; ++p) {
    if (!is_active[p]) continue;
    if (index[p] < 0 || index[p] >= n_features)
      return ffi::Error::InvalidArgument("dictlearn_sparse_backward: latent index out of range");
    ++start[index[p] + 1];
  }
  for (int64_t f = 0; f < n_features; ++f) start[f + 1] += start[f];
  std::vector<int32_t> pair_token(start[n_features]);
  std::vector<float> pair_value(start[n_features]), pair_g_value(start[n_features]);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < batch * k; ++p) {
      if (!is_active[p]) continue;
      int64_t slot = fill[index[p]]++;
      pair_token[slot] = static_cast<int32_t>(p / k);
      pair_value[slot] = value[p];
      pair_g_value[slot] = g_value[p];
    }
  }

  const int64_t n_pairs = start[n_features];
  constexpr int64_t kFloatsPerLine = 64 / sizeof(float);
  constexpr int64_t kPrefetchPairs = 3;
  float* out_dec = grad_w_dec->typed_data();
  float* out_enc = grad_w_enc->typed_data();  // [d, n_features]
  float* out_b = grad_b_enc->typed_data();
  // A task is a tile of latents: their W_enc gradient rows are built in a [tile, d] buffer and
  // stored transposed, a tile-wide contiguous run per d_model column.
  constexpr int64_t kTile = 64;
  const int64_t n_tasks = (n_features + kTile - 1) / kTile;
  ParallelFor(pool, n_tasks, [&](int64_t task) {
    std::vector<float> enc_tile(kTile * d);
    const int64_t f0 = task * kTile, f1 = std::min(n_features, f0 + kTile);
    for (int64_t f = f0; f < f1; ++f) {
      float* dec_row = out_dec + f * d;
      float* enc_row = enc_tile.data() + (f - f0) * d;
      std::fill(dec_row, dec_row + d, 0.0f);
      std::fill(enc_row, enc_row + d, 0.0f);
      const float* w_row = w + f * d;
      float b_sum = 0;
      for (int64_t s = start[f]; s < start[f + 1]; ++s) {
        const int64_t t = pair_token[s];
        // The token rows are random reads from [batch, d] arrays: request those of a pair a
        // few ahead while this one computes (measured: ~25 % faster than no prefetch at
        // 16k latents; one ahead is too late, eight too early).
        if (s + kPrefetchPairs < n_pairs) {
          const float* next_g = g + pair_token[s + kPrefetchPairs] * d;
          const float* next_c = c + pair_token[s + kPrefetchPairs] * d;
          for (int64_t j = 0; j < d; j += kFloatsPerLine) {
            __builtin_prefetch(next_g + j);
            __builtin_prefetch(next_c + j);
          }
        }
        // d loss / d pre-activation: the pair is past the ReLU, so it equals d loss / d value.
        const float g_pre = pair_g_value[s] + Dot(g + t * d, w_row, d);
        Axpy(pair_value[s], g + t * d, dec_row, d);
        Axpy(g_pre, c + t * d, enc_row, d);
        b_sum += g_pre;
      }
      out_b[f] = b_sum;
    }
    for (int64_t j = 0; j < d; ++j)
      for (int64_t f = f0; f < f1; ++f) out_enc[j * n_features + f] = enc_tile[(f - f0) * d + j];
  });
  return ffi::Error::Success();
}


// ---------------------------------------------------------------------------------------------
// Variable-L0 SAEs (JumpReLU, ReLU, BatchTopK at inference): selection, decoding and the
// threshold estimator's dot products, each costing what the active pairs cost, not the bound.

// Per row, the columns i with x[i] + rank_bias[i] > 0 (in index order), up to `bound` of them:
// pre[r, j] = x[r, i] + b_enc[i] (rounded as XLA rounds that add), indices[r, j] = i. Unused
// slots get pre = -inf and index 0. count[r] is the number of such columns, even past `bound`.
ffi::Error SelectAboveImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> b_enc, ffi::Buffer<ffi::F32> rank_bias,
                           ffi::ResultBuffer<ffi::F32> pre, ffi::ResultBuffer<ffi::S32> indices,
                           ffi::ResultBuffer<ffi::S32> count, int64_t bound) {
  auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("dictlearn_select_above: x must be 2-D");
  const int64_t rows = dims[0], n = dims[1];
  if (n > INT32_MAX) return ffi::Error::InvalidArgument("dictlearn_select_above: row too long");
  if (b_enc.element_count() != n || rank_bias.element_count() != n)
    return ffi::Error::InvalidArgument("dictlearn_select_above: biases need one entry per column");
  const float* x_data = x.typed_data();
  const float* b = b_enc.typed_data();
  const float* rb = rank_bias.typed_data();
  float* out_pre = pre->typed_data();
  int32_t* out_idx = indices->typed_data();
  int32_t* out_count = count->typed_data();
  constexpr int64_t kRowsPerTask = 16;
  const int64_t n_tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  ParallelFor(pool, n_tasks, [&](int64_t task) {
    const int64_t end = std::min(rows, (task + 1) * kRowsPerTask);
    for (int64_t r = task * kRowsPerTask; r < end; ++r) {
      const float* row = x_data + r * n;
      float* row_pre = out_pre + r * bound;
      int32_t* row_idx = out_idx + r * bound;
      int64_t c = 0;
      int64_t i = 0;
      for (; i + kLanes <= n; i += kLanes) {
        FloatLanes v, bias;
        std::memcpy(&v, row + i, sizeof(v));
        std::memcpy(&bias, rb + i, sizeof(bias));
        const FloatLanes z = v + bias;
        // Lanes that fail (or are NaN) stay out, as `z > 0` does in XLA.
        const IntLanes hit = z > 0;
        bool any = false;
        for (int64_t j = 0; j < kLanes; ++j) any |= hit[j] != 0;
        if (!any) continue;
        for (int64_t j = 0; j < kLanes; ++j) {
          if (!hit[j]) continue;
          if (c < bound) {
            row_pre[c] = row[i + j] + b[i + j];
            row_idx[c] = static_cast<int32_t>(i + j);
          }
          ++c;
        }
      }
      for (; i < n; ++i) {
        if (!(row[i] + rb[i] > 0)) continue;
        if (c < bound) {
          row_pre[c] = row[i] + b[i];
          row_idx[c] = static_cast<int32_t>(i);
        }
        ++c;
      }
      for (int64_t j = c; j < bound; ++j) {
        row_pre[j] = -std::numeric_limits<float>::infinity();
        row_idx[j] = 0;
      }
      out_count[r] = static_cast<int32_t>(std::min<int64_t>(c, INT32_MAX));
    }
  });
  return ffi::Error::Success();
}

// out[b] = sum over slots j with values[b, j] != 0 of values[b, j] * w_dec[indices[b, j]], in slot
// order: a decoder whose cost follows the active slots, not the bound.
ffi::Error SparseDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> values,
                            ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::F32> w_dec,
                            ffi::ResultBuffer<ffi::F32> out) {
  const int64_t batch = values.dimensions()[0], k = values.dimensions()[1];
  const int64_t n_features = w_dec.dimensions()[0], d = w_dec.dimensions()[1];
  const float* v = values.typed_data();
  const int32_t* idx = indices.typed_data();
  const float* w = w_dec.typed_data();
  float* o = out->typed_data();
  for (int64_t p = 0; p < batch * k; ++p)
    if (v[p] != 0 && (idx[p] < 0 || idx[p] >= n_features))
      return ffi::Error::InvalidArgument("dictlearn_sparse_decode: latent index out of range");
  constexpr int64_t kRowsPerTask = 8;
  ParallelFor(pool, (batch + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    const int64_t end = std::min(batch, (task + 1) * kRowsPerTask);
    for (int64_t b = task * kRowsPerTask; b < end; ++b) {
      float* row = o + b * d;
      std::fill(row, row + d, 0.0f);
      for (int64_t j = 0; j < k; ++j) {
        const float value = v[b * k + j];
        if (value != 0) Axpy(value, w + static_cast<int64_t>(idx[b * k + j]) * d, row, d);
      }
    }
  });
  return ffi::Error::Success();
}

// out[b, j] = g[b] . w_dec[indices[b, j]] where mask[b, j], else 0.
ffi::Error PairDotsImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> w_dec,
                        ffi::Buffer<ffi::S32> indices, ffi::Buffer<ffi::PRED> mask,
                        ffi::ResultBuffer<ffi::F32> out) {
  const int64_t batch = indices.dimensions()[0], k = indices.dimensions()[1];
  const int64_t n_features = w_dec.dimensions()[0], d = w_dec.dimensions()[1];
  const float* g_data = g.typed_data();
  const float* w = w_dec.typed_data();
  const int32_t* idx = indices.typed_data();
  const bool* m = mask.typed_data();
  float* o = out->typed_data();
  for (int64_t p = 0; p < batch * k; ++p)
    if (m[p] && (idx[p] < 0 || idx[p] >= n_features))
      return ffi::Error::InvalidArgument("dictlearn_pair_dots: latent index out of range");
  constexpr int64_t kRowsPerTask = 64;
  ParallelFor(pool, (batch + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    const int64_t end = std::min(batch, (task + 1) * kRowsPerTask);
    for (int64_t p = task * kRowsPerTask * k; p < end * k; ++p)
      o[p] = m[p] ? Dot(g_data + (p / k) * d, w + static_cast<int64_t>(idx[p]) * d, d) : 0.0f;
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DictlearnTopK, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("k")
                                  .Attr<bool>("has_bias"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DictlearnSparseBackward, SparseBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DictlearnSelectAbove, SelectAboveImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("bound"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DictlearnSparseDecode, SparseDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DictlearnPairDots, PairDotsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
