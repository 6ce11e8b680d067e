// Per-row top-k selection of the top-k codec (contract: fsl_fast/codec.py, docs/codecs.md).
//
// topk_rows_(x [N, M] float32, k, index [N, k] int64 (out), values [N, k] float32 (out)):
// per row, the positions of the k largest |x| in ascending order, ties going to the lower
// position, and the values there. One task per row, three read-only passes over it: a histogram of
// the top 11 bits of the magnitudes' bit patterns (for finite non-negative floats the order of the
// patterns is the order of the values) finds the bucket holding the k-th largest; the patterns in
// that bucket go into a per-thread scratch where std::nth_element finds the k-th largest itself
// (the threshold); the last pass writes every position above the threshold and the first
// (k - #above) positions equal to it. The selection is the PyTorch reference's (torch.topk
// threshold, then the lowest tied positions) bit for bit. A row with a NaN or an infinity is an
// error naming the first such row (found in the histogram pass, at no extra cost).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

namespace {

void topk_rows_cpu(const at::Tensor& x, int64_t k, at::Tensor index, at::Tensor values) {
  const char* op = "topk_rows_";
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              op, ": x must be a contiguous 2-D float32 CPU tensor, got ", x.scalar_type(), " ",
              x.sizes(), " on ", x.device());
  const int64_t N = x.size(0), M = x.size(1);
  TORCH_CHECK(k >= 1 && k <= M, op, ": k must be in [1, M = ", M, "], got ", k);
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong && index.is_contiguous() &&
                  index.dim() == 2 && index.size(0) == N && index.size(1) == k,
              op, ": index must be a contiguous int64 [", N, ", ", k, "] CPU tensor, got ",
              index.scalar_type(), " ", index.sizes());
  TORCH_CHECK(values.device().is_cpu() && values.scalar_type() == at::kFloat && values.is_contiguous() &&
                  values.dim() == 2 && values.size(0) == N && values.size(1) == k,
              op, ": values must be a contiguous float32 [", N, ", ", k, "] CPU tensor, got ",
              values.scalar_type(), " ", values.sizes());
  const float* xd = x.data_ptr<float>();
  int64_t* id = index.data_ptr<int64_t>();
  float* vd = values.data_ptr<float>();
  constexpr int kShift = 20;  // 31-bit magnitude patterns -> 2048 buckets
  constexpr int kBuckets = 1 << (31 - kShift);
  std::vector<char> bad(static_cast<size_t>(N), 0);
  at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
    std::vector<uint32_t> cand;
    std::vector<int64_t> hist(kBuckets);
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t* bits = reinterpret_cast<const uint32_t*>(xd + r * M);
      uint32_t thr = 0;
      int64_t ties = 0;  // how many positions equal to the threshold are kept
      uint32_t top = 0;
      if (k < M) {
        std::fill(hist.begin(), hist.end(), 0);
        for (int64_t j = 0; j < M; ++j) {
          const uint32_t m = bits[j] & 0x7FFFFFFFu;
          top = std::max(top, m);
          ++hist[m >> kShift];
        }
      } else {
        for (int64_t j = 0; j < M; ++j) top = std::max(top, bits[j] & 0x7FFFFFFFu);
      }
      if (top >= 0x7F800000u) {  // Inf or NaN
        bad[r] = 1;
        continue;
      }
      if (k < M) {
        int64_t above = 0;  // elements in buckets above b
        int b = kBuckets - 1;
        while (above + hist[b] < k) above += hist[b--];
        cand.clear();
        for (int64_t j = 0; j < M; ++j) {
          const uint32_t m = bits[j] & 0x7FFFFFFFu;
          if ((m >> kShift) == static_cast<uint32_t>(b)) cand.push_back(m);
        }
        const int64_t need = k - above;  // from the bucket, 1 <= need <= hist[b]
        std::nth_element(cand.begin(), cand.begin() + (need - 1), cand.end(), std::greater<uint32_t>());
        thr = cand[need - 1];
        int64_t in_bucket_above = 0;
        for (const uint32_t m : cand) in_bucket_above += m > thr;
        ties = need - in_bucket_above;
      }
      int64_t* irow = id + r * k;
      float* vrow = vd + r * k;
      const float* row = xd + r * M;
      int64_t n = 0;
      for (int64_t j = 0; j < M && n < k; ++j) {
        const uint32_t m = bits[j] & 0x7FFFFFFFu;
        const bool keep = k == M || m > thr || (m == thr && ties > 0);
        if (keep && k < M && m == thr) --ties;
        if (keep) {
          irow[n] = j;
          vrow[n] = row[j];
          ++n;
        }
      }
    }
  });
  const auto first = std::find(bad.begin(), bad.end(), 1);
  TORCH_CHECK(first == bad.end(), op, ": non-finite value in row ", first - bad.begin());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fsl_fast, m) {
  m.def("topk_rows_(Tensor x, int k, Tensor(a!) index, Tensor(b!) values) -> ()");
}

TORCH_LIBRARY_IMPL(fsl_fast, CPU, m) { m.impl("topk_rows_", &topk_rows_cpu); }
