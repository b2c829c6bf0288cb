// y = x @ W^T for low-bit weights kept packed, W[n, k] = code[n, k] * scales[n, g] + offsets[n, g],
// g = k / group. Codes are unsigned `bits`-bit integers packed little end first: 8 bits one per byte,
// 4 two per byte (even column in the low nibble), 2 four per byte (column k at bits 2 * (k % 4)).
//
// As in llama.cpp, the activations are rounded to int8 in blocks of 32 (one float scale per block),
// so a block's dot product is integer arithmetic on 32 lanes at once (vpmaddubsw: unsigned codes x
// signed activations): several times fewer instructions than converting every weight to float, and
// batch-1 decoding is bound by instructions here, not by memory. The activation rounding error is
// under half a step of a 127-level grid per block, measured in tests against dequantize-then-matmul.
//   sum_k W[n, k] x[k] = sum_blocks scales * xscale_b * sum_(k in b) code_k xq_k + offsets * sum_k x_k
// 8-bit codes are shifted to signed (code - 128) so the products cannot saturate 16 bits; the
// offset then absorbs the 128 * scale.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;  // activations per int8 scale
constexpr int64_t kRows = 4;    // rows of x that share one decode of a weight row

// the 32 codes of a block, in column order, as unsigned (2, 4 bits) or signed (8 bits, code - 128) bytes
template <int bits>
inline __m256i codes32(const uint8_t* block) {
  if constexpr (bits == 8) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block));
    return _mm256_xor_si256(raw, _mm256_set1_epi8(static_cast<char>(0x80)));
  } else if constexpr (bits == 4) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block));
    __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    return _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
  } else {
    const __m128i mask = _mm_set1_epi8(0x03);
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block));
    __m128i v0 = _mm_and_si128(b, mask), v1 = _mm_and_si128(_mm_srli_epi16(b, 2), mask);
    __m128i v2 = _mm_and_si128(_mm_srli_epi16(b, 4), mask), v3 = _mm_and_si128(_mm_srli_epi16(b, 6), mask);
    __m128i a = _mm_unpacklo_epi8(v0, v1), c = _mm_unpacklo_epi8(v2, v3);
    return _mm256_set_m128i(_mm_unpackhi_epi16(a, c), _mm_unpacklo_epi16(a, c));
  }
}

// 8 int32 partial sums of codes . xq over one block
template <int bits>
inline __m256i block_dot(__m256i codes, __m256i xq) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i pairs;
  if constexpr (bits == 8) {  // both signed: |codes| as the unsigned operand, its sign moved onto xq
    pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(codes, codes), _mm256_sign_epi8(xq, codes));
  } else {
    pairs = _mm256_maddubs_epi16(codes, xq);
  }
  return _mm256_madd_epi16(pairs, ones);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// the scaled sum over one weight row for `rows` rows of quantized x, as float vectors in acc[]
template <int bits, int rows>
void row_dots(const uint8_t* row, const int8_t* XQ, const float* XS, int64_t K, int64_t m0, int64_t group,
              const float* S, __m256* acc) {
  const int64_t blocks = K / kBlock, per_group = group / kBlock, block_bytes = kBlock * bits / 8;
  for (int r = 0; r < rows; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const __m256i codes = codes32<bits>(row + b * block_bytes);
    const float scale = S[b / per_group];
    for (int r = 0; r < rows; ++r) {
      const int64_t m = m0 + r;
      __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(XQ + m * K + b * kBlock));
      __m256 sums = _mm256_cvtepi32_ps(block_dot<bits>(codes, xq));
      acc[r] = _mm256_fmadd_ps(sums, _mm256_set1_ps(scale * XS[m * blocks + b]), acc[r]);
    }
  }
}

using RowDots = void (*)(const uint8_t*, const int8_t*, const float*, int64_t, int64_t, int64_t, const float*, __m256*);

template <int bits>
RowDots row_dots_for(int64_t rows) {
  switch (rows) {
    case 1: return row_dots<bits, 1>;
    case 2: return row_dots<bits, 2>;
    case 3: return row_dots<bits, 3>;
    default: return row_dots<bits, 4>;
  }
}

RowDots pick(int64_t bits, int64_t rows) {
  return bits == 8 ? row_dots_for<8>(rows) : bits == 4 ? row_dots_for<4>(rows) : row_dots_for<2>(rows);
}

// x (M, K) float -> int8 codes and one scale per block of 32 (absmax / 127), and each block's plain sum
void quantize_activations(const float* X, int64_t M, int64_t K, int8_t* XQ, float* XS, float* XSUM) {
  const int64_t blocks = M * (K / kBlock);
  auto work = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* x = X + i * kBlock;  // rows are contiguous, blocks tile them exactly
      float amax = 0.0f, sum = 0.0f;
      for (int64_t j = 0; j < kBlock; ++j) {
        amax = std::max(amax, std::fabs(x[j]));
        sum += x[j];
      }
      const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
      XS[i] = amax / 127.0f;
      XSUM[i] = sum;
      for (int64_t j = 0; j < kBlock; ++j) XQ[i * kBlock + j] = static_cast<int8_t>(std::nearbyint(x[j] * inverse));
    }
  };
  if (blocks < 2048) work(0, blocks);  // a decoding step's few blocks: not worth waking threads
  else at::parallel_for(0, blocks, 256, work);
}

}  // namespace

torch::Tensor lowbit_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor offsets,
                            int64_t bits, int64_t group) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits must be 2, 4 or 8");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a float32 matrix");
  TORCH_CHECK(packed.scalar_type() == at::kByte && scales.scalar_type() == at::kFloat &&
              offsets.scalar_type() == at::kFloat, "packed must be uint8, scales and offsets float32");
  x = x.contiguous();
  packed = packed.contiguous();
  scales = scales.contiguous();
  offsets = offsets.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0), G = K / group;
  TORCH_CHECK(group % kBlock == 0 && K % group == 0, "the group size must be a multiple of 32 dividing the width");
  TORCH_CHECK(packed.size(1) * 8 == K * bits && scales.size(0) == N && scales.size(1) == G &&
              offsets.sizes() == scales.sizes(), "packed weights, scales and offsets do not match the input width");
  auto y = torch::empty({M, N}, x.options());
  std::vector<int8_t> xq(M * K);
  const int64_t blocks = K / kBlock, per_group = group / kBlock;
  std::vector<float> xs(M * blocks), block_sums(M * blocks), group_sums(M * G, 0.0f);
  quantize_activations(x.data_ptr<float>(), M, K, xq.data(), xs.data(), block_sums.data());
  // the offsets multiply each group's plain sum of x (exact, from the float activations)
  for (int64_t i = 0; i < M * blocks; ++i) group_sums[i / per_group] += block_sums[i];
  const float* XSUM = group_sums.data();
  const uint8_t* P = packed.data_ptr<uint8_t>();
  const float* S = scales.data_ptr<float>();
  const float* O = offsets.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t row_bytes = K * bits / 8;
  const float shift = bits == 8 ? 128.0f : 0.0f;  // codes were read as code - 128
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    __m256 acc[kRows];
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const int64_t rows = std::min(kRows, M - m0);
        pick(bits, rows)(P + n * row_bytes, xq.data(), xs.data(), K, m0, group, S + n * G, acc);
        for (int64_t r = 0; r < rows; ++r) {
          float total = hsum(acc[r]);
          for (int64_t g = 0; g < G; ++g) total += (O[n * G + g] + shift * S[n * G + g]) * XSUM[(m0 + r) * G + g];
          Y[(m0 + r) * N + n] = total;
        }
      }
    }
  });
  return y;
}

// an operator of PyTorch's dispatcher (torch.ops.babyllama.lowbit_matmul): called from eager code or
// a compiled graph with no Python in between (a Python custom op cost ~45 us a call here)
TORCH_LIBRARY(babyllama, m) {
  m.def("lowbit_matmul(Tensor x, Tensor packed, Tensor scales, Tensor offsets, int bits, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(babyllama, CPU, m) {
  m.impl("lowbit_matmul", &lowbit_matmul);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
