// rose_ds's CPU kernels: ROSE's masked AdamW in one pass over (p, g, m, v) that also returns the
// squared norm of the new momentum; blocked squared norms; and element granularity without a score
// or mask in memory (the counting pass of the sampled-bracket selection and the update both compute
// each element's score from g, m or the robust gradient as they read them).
//
// Built at first use by rose_ds/kernels.py (torch.utils.cpp_extension; -O3 -march=native -fopenmp
// -ffp-contract=off -fno-math-errno -fno-trapping-math). Every result is independent of the number
// of threads and of the order in which they finish: work is cut into fixed chunks by element index,
// each chunk writes its own partial result, and partials are combined in chunk order.
// -ffp-contract=off keeps a * b + c two roundings, as torch computes it, so scores equal torch's bit
// for bit and a loop's vector and scalar iterations round alike.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <omp.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace {

// Elements per fp32 partial sum of squares: rose_ds.optim.CPU_NORM_BLOCK (docs/algorithm.md,
// "squared norms": fp32 within a block, fp64 across blocks).
constexpr int64_t kBlock = 512;
// Elements per unit of parallel work; a multiple of kBlock, so blocks start at fixed offsets from
// the start of each tensor whatever the number of threads.
constexpr int64_t kChunk = 1 << 16;
// Independent fp32 accumulators per block: element i of a block goes to lane i % kLanes.
constexpr int kLanes = 16;

// The lanes of a block, added in a fixed tree.
inline float reduce_lanes(const float* acc) {
  float s8[8], s4[4];
  for (int j = 0; j < 8; ++j) s8[j] = acc[j] + acc[j + 8];
  for (int j = 0; j < 4; ++j) s4[j] = s8[j] + s8[j + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// Squared sum of one block: fp32 lanes, added in a fixed tree.
inline float block_sum_squares(const float* __restrict x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j] * x[i + j];
  }
  for (int j = 0; i + j < n; ++j) acc[j] += x[i + j] * x[i + j];
  return reduce_lanes(acc);
}

// torch.lerp's formula: exact at both ends (weight 0 gives a, weight 1 gives b). Both sides are
// computed and one is selected: a branch around arithmetic would keep the loop from vectorising.
inline float lerp(float a, float b, float w) {
  const float d = b - a;
  const float low = a + w * d;
  const float high = b - d * (1.0f - w);
  return w < 0.5f ? low : high;
}

// rose_ds.selection.element_second_order_scores: |coef * g / m - 1|, inf where m == 0.
inline float second_order_score(float g, float m, float coef) {
  const float score = std::fabs(coef * g / m - 1.0f);  // computed first: no branch around the division
  return m == 0.0f ? std::numeric_limits<float>::infinity() : score;
}

// 1 where lo <= s <= hi and s is finite (NaN compares false), else 0.
inline float in_band(float s, float lo, float hi) {
  return static_cast<float>((s >= lo) & (s <= hi) & (std::fabs(s) <= FLT_MAX));
}

// A non-negative float's bits as an int32: the same order (rose_ds.radix.order_keys(nonnegative=True)).
inline int32_t key_of(float s) {
  int32_t k;
  std::memcpy(&k, &s, sizeof k);
  return k;
}

struct Hyper {
  float beta1_weight;  // 1 - beta1: m moves toward g' by this fraction
  float beta2, one_minus_beta2, eps;
  float step_size;  // lr * sqrt(1 - beta2^t) / (1 - beta1^t)
  float lr_wd;      // lr * weight_decay
};

// How one tensor (or segment) is stepped: a coefficient for the whole tensor (c = 1, 0 < c < 1,
// c = 0), a coefficient per element in memory (bool or float), or per element from the bands of
// element granularity (first-order, second-order, ensemble, the ensemble's step 1).
enum Kind {
  kAdam,
  kMixed,
  kFrozen,
  kElementBool,
  kElementFloat,
  kBandFirst,
  kBandSecond,
  kBandEnsemble,
  kBandEnsembleFirstOnly,
};

struct Entry {
  float* p;
  const float* g;
  float* m;
  float* v;
  const uint8_t* keep;  // kElementBool
  const float* c_elem;  // kElementFloat
  const float* robust;  // kBand*: the robust gradient (first-order scores |robust|)
  int64_t numel;
  Kind kind;
  float c;      // kMixed
  float scale;  // step_size * c
  float decay;  // 1 - lr * weight_decay * c
  float lo1, hi1, lo2, hi2, coef, gamma, one_minus_gamma;  // kBand*
  bool norm;                                               // accumulate the squared norm of the new m
};

// The update of elements [b, b + n) of one entry; returns the sum of c over them (kBand* only).
// Same formulas as rose_ds.optim.masked_adamw_:
//   g' = c g + (1 - c) m;  m += (1 - beta1) (g' - m);  v = beta2 v + (1 - beta2) g'^2
//   p = (p - step_size c m / (sqrt(v) + eps)) (1 - lr wd c)
template <int K>
double update_block(const Entry& e, const Hyper& h, int64_t b, int64_t n) {
  float* __restrict m = e.m + b;
  float* __restrict v = e.v + b;
  if constexpr (K == kFrozen) {  // g' = m: m and p stay, v moves toward m^2
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) v[i] = h.beta2 * v[i] + h.one_minus_beta2 * (m[i] * m[i]);
    return 0.0;
  } else {
    constexpr bool band = K == kBandFirst || K == kBandSecond || K == kBandEnsemble || K == kBandEnsembleFirstOnly;
    constexpr bool per_element = band || K == kElementFloat;
    float* __restrict p = e.p + b;
    const float* __restrict g = e.g + b;
    const uint8_t* __restrict keep = K == kElementBool ? e.keep + b : nullptr;
    const float* __restrict cs = K == kElementFloat ? e.c_elem + b : nullptr;
    const float* __restrict r = (K == kBandFirst || K == kBandEnsemble || K == kBandEnsembleFirstOnly)
                                    ? e.robust + b : nullptr;  // clang-format off
    const float c0 = e.c, w1 = h.beta1_weight, beta2 = h.beta2, w2 = h.one_minus_beta2, eps = h.eps;
    const float step = h.step_size, lr_wd = h.lr_wd, scale0 = e.scale, decay0 = e.decay;
    const float lo1 = e.lo1, hi1 = e.hi1, lo2 = e.lo2, hi2 = e.hi2, coef = e.coef;
    const float gamma = e.gamma, one_minus_gamma = e.one_minus_gamma;
    double kept = 0.0;  // exact: a chunk's c values are multiples of 2^-25 below 2^28 in total
#pragma omp simd reduction(+ : kept)
    for (int64_t i = 0; i < n; ++i) {
      const float mi = m[i];
      const float gi = g[i];
      float gp = gi, scale = scale0, decay = decay0, c = 1.0f;
      bool kept_i = true;
      if constexpr (K == kMixed) {
        gp = lerp(mi, gi, c0);
      } else if constexpr (K == kElementBool) {
        kept_i = keep[i] != 0;
        gp = kept_i ? gi : mi;
      } else if constexpr (per_element) {
        if constexpr (K == kElementFloat) {
          c = cs[i];
        } else {
          // rose_ds.selection.ElementBands.coefficients, element by element
          const float m1 = K == kBandSecond ? 1.0f : in_band(std::fabs(r[i]), lo1, hi1);
          const float m2 = (K == kBandSecond || K == kBandEnsemble) ? in_band(second_order_score(gi, mi, coef), lo2, hi2)
                                                                    : 1.0f;
          if constexpr (K == kBandFirst) c = m1;
          if constexpr (K == kBandSecond) c = m2;
          if constexpr (K == kBandEnsemble) c = one_minus_gamma * m2 + gamma * m1;
          if constexpr (K == kBandEnsembleFirstOnly) c = m1 != 0.0f ? 1.0f : one_minus_gamma;
          kept += static_cast<double>(c);
        }
        const float mixed = lerp(mi, gi, c);
        kept_i = c != 0.0f;
        gp = kept_i ? mixed : mi;
        scale = step * c;
        decay = 1.0f - lr_wd * c;
      }
      const float m_new = mi + w1 * (gp - mi);
      const float v_new = beta2 * v[i] + w2 * (gp * gp);
      const float p_new = (p[i] - scale * (m_new / (std::sqrt(v_new) + eps))) * decay;
      m[i] = m_new;
      v[i] = v_new;
      p[i] = kept_i ? p_new : p[i];  // a frozen element keeps its weight exactly
    }
    return kept;
  }
}

// Elements [begin, end) of one entry (begin a multiple of kBlock), a block at a time: the fp64 sum
// of the blocks' fp32 sums of the new m squared (0 when the entry wants no norm), and the sum of c.
// The norm reads each block's m back from L1 right after writing it, with the function that
// sum_of_squares uses: a momentum norm recomputed later equals this one bit for bit.
template <int K>
std::pair<double, double> update_entry(const Entry& e, const Hyper& h, int64_t begin, int64_t end) {
  double norm = 0.0, kept = 0.0;
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    kept += update_block<K>(e, h, b, n);
    if (e.norm) norm += static_cast<double>(block_sum_squares(e.m + b, n));
  }
  return {norm, kept};
}

struct Item {
  int64_t entry, begin, end;
};

// Fixed chunks of every entry, in entry order.
std::vector<Item> chunk_items(const std::vector<int64_t>& numels) {
  std::vector<Item> items;
  for (size_t e = 0; e < numels.size(); ++e)
    for (int64_t b = 0; b < numels[e]; b += kChunk) items.push_back({static_cast<int64_t>(e), b, std::min(numels[e], b + kChunk)});
  return items;
}

int thread_count(int64_t items) {
  return std::max(1, static_cast<int>(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(items, 1))));
}

// Runs fn(item) -> (a, b) for every item on torch's intra-op thread count (dynamic scheduling:
// frozen entries cost less than kept ones), then adds the partials of each entry in item order.
template <typename Fn>
std::pair<std::vector<double>, std::vector<double>> run_items(const std::vector<Item>& items, size_t entries, Fn fn) {
  std::vector<std::pair<double, double>> partial(items.size());
  const int64_t count = static_cast<int64_t>(items.size());
  const int threads = thread_count(count);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t k = 0; k < count; ++k) partial[k] = fn(items[k]);
  std::vector<double> first(entries, 0.0), second(entries, 0.0);
  for (int64_t k = 0; k < count; ++k) {
    first[items[k].entry] += partial[k].first;
    second[items[k].entry] += partial[k].second;
  }
  return {first, second};
}

void check_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), what,
              " must be a contiguous float32 CPU tensor");
}

void bump(const at::Tensor& t) {  // written through its pointer: tell autograd it changed
  if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

double step_size_of(double lr, double beta1, double beta2, int64_t step) {
  return lr * std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))) / (1.0 - std::pow(beta1, static_cast<double>(step)));
}

// The tensors of entry i, checked.
Entry make_entry(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                 const at::Tensor& exp_avg_sq) {
  check_float(param, "param");
  check_float(grad, "grad");
  check_float(exp_avg, "exp_avg");
  check_float(exp_avg_sq, "exp_avg_sq");
  const int64_t numel = param.numel();
  TORCH_CHECK(grad.numel() == numel && exp_avg.numel() == numel && exp_avg_sq.numel() == numel,
              "masked_adamw: a parameter, its gradient and its moments differ in size");
  Entry e{};
  e.p = param.data_ptr<float>();
  e.g = grad.data_ptr<float>();
  e.m = exp_avg.data_ptr<float>();
  e.v = exp_avg_sq.data_ptr<float>();
  e.numel = numel;
  return e;
}

std::pair<std::vector<double>, std::vector<double>> run_update(const std::vector<Entry>& entries, const Hyper& h) {
  std::vector<int64_t> numels;
  for (const auto& e : entries) numels.push_back(e.numel);
  return run_items(chunk_items(numels), entries.size(), [&](const Item& it) {
    const Entry& e = entries[it.entry];
    switch (e.kind) {
      case kAdam: return update_entry<kAdam>(e, h, it.begin, it.end);
      case kMixed: return update_entry<kMixed>(e, h, it.begin, it.end);
      case kFrozen: return update_entry<kFrozen>(e, h, it.begin, it.end);
      case kElementBool: return update_entry<kElementBool>(e, h, it.begin, it.end);
      case kElementFloat: return update_entry<kElementFloat>(e, h, it.begin, it.end);
      case kBandFirst: return update_entry<kBandFirst>(e, h, it.begin, it.end);
      case kBandSecond: return update_entry<kBandSecond>(e, h, it.begin, it.end);
      case kBandEnsemble: return update_entry<kBandEnsemble>(e, h, it.begin, it.end);
      default: return update_entry<kBandEnsembleFirstOnly>(e, h, it.begin, it.end);
    }
  });
}

void bump_all(const std::vector<Entry>& entries, const std::vector<at::Tensor>& params,
              const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs) {
  for (size_t i = 0; i < entries.size(); ++i) {
    bump(exp_avg_sqs[i]);
    if (entries[i].kind != kFrozen) {
      bump(params[i]);
      bump(exp_avgs[i]);
    }
  }
}

at::Tensor doubles(const std::vector<double>& values) {
  return at::tensor(values, at::TensorOptions().dtype(at::kDouble));
}

// Keys scored per group of the counting pass (4 KB: they stay in L1 between the two loops).
constexpr int64_t kKeyGroup = 1024;

// keys[0, len) against the bracket [lo, hi]: returns how many lie below it, appends those inside it.
inline int64_t count_group(const int32_t* __restrict keys, int64_t len, int32_t lo, int32_t hi,
                           std::vector<int32_t>& inside) {
  int64_t below = 0, i = 0;
#if defined(__AVX2__)
  // 8 keys a step: the comparisons as vector masks; one movemask tells whether any key is inside
  // (about 1 in 100 are), so the copy runs only for those steps.
  const __m256i vlo = _mm256_set1_epi32(lo), vhi = _mm256_set1_epi32(hi);
  __m256i under = _mm256_setzero_si256();
  for (; i + 8 <= len; i += 8) {
    const __m256i key = _mm256_load_si256(reinterpret_cast<const __m256i*>(keys + i));
    const __m256i lt = _mm256_cmpgt_epi32(vlo, key);  // key < lo
    const __m256i gt = _mm256_cmpgt_epi32(key, vhi);  // key > hi
    under = _mm256_sub_epi32(under, lt);              // lt is -1 where true
    int mask = ~_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(lt, gt))) & 0xFF;
    while (mask != 0) {
      inside.push_back(keys[i + __builtin_ctz(mask)]);
      mask &= mask - 1;
    }
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), under);
  for (int j = 0; j < 8; ++j) below += lanes[j];
#endif
  for (; i < len; ++i) {
    below += keys[i] < lo;
    if (keys[i] >= lo && keys[i] <= hi) inside.push_back(keys[i]);
  }
  return below;
}

}  // namespace

// ROSE's masked AdamW over lists of same-size tensors (or segment views), one pass each; returns
// the float64 squared norm of each new momentum (0 where `norms[i]` is false).
at::Tensor masked_adamw(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                        const std::vector<double>& coefficients,
                        const std::vector<c10::optional<at::Tensor>>& element_coefficients,
                        const std::vector<bool>& norms, double lr, double beta1, double beta2, double eps,
                        double weight_decay, int64_t step) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && coefficients.size() == n &&
                  element_coefficients.size() == n && norms.size() == n,
              "masked_adamw: lists of different lengths");
  const double step_size = step_size_of(lr, beta1, beta2, step);
  const Hyper h{static_cast<float>(1.0 - beta1), static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                static_cast<float>(eps), static_cast<float>(step_size), static_cast<float>(lr * weight_decay)};
  std::vector<Entry> entries;
  for (size_t i = 0; i < n; ++i) {
    const double c = coefficients[i];
    Entry e = make_entry(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]);
    e.norm = norms[i];
    e.c = static_cast<float>(c);
    e.scale = static_cast<float>(step_size * c);
    e.decay = static_cast<float>(1.0 - lr * weight_decay * c);
    if (element_coefficients[i].has_value()) {
      const at::Tensor& ct = *element_coefficients[i];
      TORCH_CHECK(ct.device().is_cpu() && ct.is_contiguous() && ct.numel() == e.numel,
                  "masked_adamw: an element coefficient must be a contiguous CPU tensor of the parameter's size");
      if (ct.scalar_type() == at::kBool) {
        e.kind = kElementBool;
        e.keep = reinterpret_cast<const uint8_t*>(ct.data_ptr<bool>());
        e.scale = static_cast<float>(step_size);
        e.decay = static_cast<float>(1.0 - lr * weight_decay);
      } else {
        TORCH_CHECK(ct.scalar_type() == at::kFloat, "masked_adamw: element coefficients must be bool or float32");
        e.kind = kElementFloat;
        e.c_elem = ct.data_ptr<float>();
      }
    } else {
      TORCH_CHECK(c >= 0.0 && c <= 1.0, "masked_adamw: a coefficient must lie in [0, 1]");
      e.kind = c == 1.0 ? kAdam : c == 0.0 ? kFrozen : kMixed;
    }
    entries.push_back(e);
  }
  const auto totals = run_update(entries, h);
  bump_all(entries, params, exp_avgs, exp_avg_sqs);
  return doubles(totals.first);
}

// Element granularity's update with each element's c taken from the bands (rose_ds.selection.
// ElementBands): mode 0 first (M1 from |robust|), 1 second (M2 from |coef g / m - 1| with m before
// the step), 2 ensemble ((1 - gamma) M2 + gamma M1; without second-order bands, step 1: M1 ? 1 : 1 -
// gamma). A band is (lo, hi) per entry. Returns the sum of c over each entry (its kept elements).
at::Tensor band_adamw(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                      const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                      const std::vector<c10::optional<at::Tensor>>& robust, const std::vector<double>& first_bands,
                      const std::vector<double>& second_bands, int64_t mode, double coef, double gamma, double lr,
                      double beta1, double beta2, double eps, double weight_decay, int64_t step) {
  const size_t n = params.size();
  const bool first = mode != 1, second = !second_bands.empty();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && robust.size() == n,
              "band_adamw: lists of different lengths");
  TORCH_CHECK(mode >= 0 && mode <= 2 && (!first || first_bands.size() == 2 * n) &&
                  (!second || second_bands.size() == 2 * n) && (mode != 1 || second),
              "band_adamw: a (lo, hi) band per entry for each score the mode uses");
  const double step_size = step_size_of(lr, beta1, beta2, step);
  const Hyper h{static_cast<float>(1.0 - beta1), static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                static_cast<float>(eps), static_cast<float>(step_size), static_cast<float>(lr * weight_decay)};
  std::vector<Entry> entries;
  for (size_t i = 0; i < n; ++i) {
    Entry e = make_entry(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]);
    if (first) {
      TORCH_CHECK(robust[i].has_value(), "band_adamw: first-order bands need the robust gradient");
      check_float(*robust[i], "robust gradient");
      TORCH_CHECK(robust[i]->numel() == e.numel, "band_adamw: the robust gradient differs in size");
      e.robust = robust[i]->data_ptr<float>();
      e.lo1 = static_cast<float>(first_bands[2 * i]);
      e.hi1 = static_cast<float>(first_bands[2 * i + 1]);
    }
    if (second) {
      e.lo2 = static_cast<float>(second_bands[2 * i]);
      e.hi2 = static_cast<float>(second_bands[2 * i + 1]);
    }
    e.coef = static_cast<float>(coef);
    e.gamma = static_cast<float>(gamma);  // float32 as the torch path's (1 - gamma) * M2 + gamma * M1
    e.one_minus_gamma = static_cast<float>(1.0 - gamma);
    e.kind = mode == 0 ? kBandFirst : mode == 1 ? kBandSecond : second ? kBandEnsemble : kBandEnsembleFirstOnly;
    entries.push_back(e);
  }
  const auto totals = run_update(entries, h);
  bump_all(entries, params, exp_avgs, exp_avg_sqs);
  return doubles(totals.second);
}

// Squared L2 norm of each float32 tensor: fp32 sums over kBlock-element blocks, added in fp64.
at::Tensor sum_of_squares(const std::vector<at::Tensor>& tensors) {
  std::vector<int64_t> numels;
  std::vector<const float*> data;
  for (const auto& t : tensors) {
    check_float(t, "sum_of_squares: a tensor");
    numels.push_back(t.numel());
    data.push_back(t.data_ptr<float>());
  }
  const std::vector<Item> items = chunk_items(numels);
  const auto totals = run_items(items, tensors.size(), [&](const Item& it) {
    double total = 0.0;
    for (int64_t b = it.begin; b < it.end; b += kBlock)
      total += static_cast<double>(block_sum_squares(data[it.entry] + b, std::min(kBlock, it.end - b)));
    return std::pair<double, double>{total, 0.0};
  });
  return doubles(totals.first);
}

// |coef * g / m - 1| per element, float32, inf where m == 0: rose_ds.selection's formula, bit for bit.
at::Tensor second_order_scores(const at::Tensor& grad, const at::Tensor& momentum, double coef) {
  check_float(grad, "grad");
  check_float(momentum, "momentum");
  TORCH_CHECK(grad.numel() == momentum.numel(), "second_order_scores: sizes differ");
  at::Tensor out = at::empty(grad.sizes(), grad.options());
  const float* g = grad.data_ptr<float>();
  const float* m = momentum.data_ptr<float>();
  float* s = out.data_ptr<float>();
  const float k = static_cast<float>(coef);
  const int64_t numel = grad.numel(), count = (numel + kChunk - 1) / kChunk;
  const int threads = thread_count(count);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t c = 0; c < count; ++c) {
    const int64_t begin = c * kChunk, end = std::min(numel, begin + kChunk);
    const float* __restrict gc = g + begin;
    const float* __restrict mc = m + begin;
    float* __restrict sc = s + begin;
#pragma omp simd
    for (int64_t i = 0; i < end - begin; ++i) sc[i] = second_order_score(gc[i], mc[i], k);
  }
  return out;
}

// The counting pass of the sampled-bracket selection (rose_ds.radix.sampled_quantiles) over scores
// computed as they are read: part i's scores are |a_i| (first-order: the robust gradient) or, with
// b_i, |coef a_i / b_i - 1| (second-order: gradient and momentum). For each bracket
// [lows[k], highs[k]] of int32 keys (a non-negative float's bits): how many keys lie below it, and
// the keys inside it, in element order.
std::tuple<at::Tensor, std::vector<at::Tensor>> bracket_count(const std::vector<at::Tensor>& a,
                                                              const std::vector<c10::optional<at::Tensor>>& b,
                                                              double coef, const std::vector<int64_t>& lows,
                                                              const std::vector<int64_t>& highs) {
  const size_t brackets = lows.size();
  TORCH_CHECK(highs.size() == brackets && b.size() == a.size(), "bracket_count: lists of different lengths");
  for (size_t k = 0; k < brackets; ++k)
    TORCH_CHECK(lows[k] >= INT32_MIN && highs[k] <= INT32_MAX, "bracket_count: bounds must be int32 keys");
  std::vector<int64_t> numels;
  for (size_t i = 0; i < a.size(); ++i) {
    check_float(a[i], "bracket_count: a score source");
    if (b[i].has_value()) {
      check_float(*b[i], "bracket_count: a momentum");
      TORCH_CHECK(b[i]->numel() == a[i].numel(), "bracket_count: sizes differ");
    }
    numels.push_back(a[i].numel());
  }
  const std::vector<Item> items = chunk_items(numels);
  const int64_t count = static_cast<int64_t>(items.size());
  std::vector<std::vector<int64_t>> below(count, std::vector<int64_t>(brackets, 0));
  std::vector<std::vector<std::vector<int32_t>>> inside(count, std::vector<std::vector<int32_t>>(brackets));
  const float k_coef = static_cast<float>(coef);
  const int threads = thread_count(count);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t c = 0; c < count; ++c) {
    const Item& it = items[c];
    const float* __restrict x = a[it.entry].data_ptr<float>() + it.begin;
    const float* __restrict y = b[it.entry].has_value() ? b[it.entry]->data_ptr<float>() + it.begin : nullptr;
    const int64_t n = it.end - it.begin;
    std::vector<int64_t>& under = below[c];
    alignas(32) int32_t keys[kKeyGroup];
    // groups of kKeyGroup: the keys computed vectorised into L1, then counted and (rarely) copied
    for (int64_t g = 0; g < n; g += kKeyGroup) {
      const int64_t len = std::min<int64_t>(kKeyGroup, n - g);
      if (y != nullptr) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) keys[i] = key_of(second_order_score(x[g + i], y[g + i], k_coef));
      } else {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) keys[i] = key_of(std::fabs(x[g + i]));
      }
      for (size_t k = 0; k < brackets; ++k)
        under[k] += count_group(keys, len, static_cast<int32_t>(lows[k]), static_cast<int32_t>(highs[k]), inside[c][k]);
    }
  }
  at::Tensor below_total = at::zeros({static_cast<int64_t>(brackets)}, at::TensorOptions().dtype(at::kLong));
  int64_t* below_out = below_total.data_ptr<int64_t>();
  std::vector<at::Tensor> candidates;
  for (size_t k = 0; k < brackets; ++k) {
    int64_t total = 0, size = 0;
    for (int64_t c = 0; c < count; ++c) {
      total += below[c][k];
      size += static_cast<int64_t>(inside[c][k].size());
    }
    below_out[k] = total;
    at::Tensor out = at::empty({size}, at::TensorOptions().dtype(at::kInt));
    int32_t* dst = out.data_ptr<int32_t>();
    for (int64_t c = 0; c < count; ++c) dst = std::copy(inside[c][k].begin(), inside[c][k].end(), dst);
    candidates.push_back(out);
  }
  return {below_total, candidates};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released while a kernel runs: other Python threads (ranks simulated by threads, a
  // data loader) go on meanwhile.
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("masked_adamw", &masked_adamw, release(),
        "ROSE's masked AdamW in one pass; returns each new momentum's squared norm");
  m.def("band_adamw", &band_adamw, release(),
        "element granularity's masked AdamW, c from the bands; returns each sum of c");
  m.def("sum_of_squares", &sum_of_squares, release(), "blocked squared L2 norms of float32 tensors (float64)");
  m.def("second_order_scores", &second_order_scores, release(), "element second-order scores |coef g / m - 1|");
  m.def("bracket_count", &bracket_count, release(),
        "scores below and inside each bracket, computed as they are read");
}
