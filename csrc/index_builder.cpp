#include "index_builder.h"

#include <cmath>
#include <cstdlib>
#include <new>
#include <limits>
#include <stdexcept>
#include <string>

namespace llama3hp {

namespace {

// Segment k's size is sizes[k] (Gather = false) or sizes[doc_idx[k]] (Gather = true); a template
// parameter so the in-order loop carries no branch for it.
// Rows appended to a malloc'ed buffer that grows by realloc: glibc moves large blocks with mremap,
// so growing copies nothing, and the output needs no pass over the sizes to be sized first (such
// a pass was 15% of the in-order time at 10M documents; std::vector's copying growth another 8%).
class RowBuffer {
   public:
    RowBuffer() : data_(static_cast<int64_t*>(std::malloc(cap_ * sizeof(int64_t)))) {
        if (data_ == nullptr) throw std::bad_alloc();
    }
    ~RowBuffer() { std::free(data_); }
    RowBuffer(const RowBuffer&) = delete;
    RowBuffer& operator=(const RowBuffer&) = delete;
    void push(int64_t segment, int64_t offset) {
        if (size_ + 2 > cap_) grow();
        data_[size_] = segment;
        data_[size_ + 1] = offset;
        size_ += 2;
    }
    SampleRows release() {
        SampleRows rows{data_, size_ / 2};
        data_ = nullptr;
        return rows;
    }

   private:
    void grow() {
        auto* p = static_cast<int64_t*>(std::realloc(data_, 2 * cap_ * sizeof(int64_t)));
        if (p == nullptr) throw std::bad_alloc();
        data_ = p;
        cap_ *= 2;
    }
    int64_t cap_ = 4096;
    int64_t size_ = 0;
    int64_t* data_;
};

template <bool Gather, typename S, typename D>
SampleRows sample_idx_impl(const S* sizes, int64_t n_sizes, const D* doc_idx, int64_t n_segments, int64_t seq_len) {
    if (seq_len < 1) {
        throw std::invalid_argument("build_sample_idx: seq_len must be >= 1, got " + std::to_string(seq_len));
    }
    RowBuffer out;
    // One pass over the segments: each boundary target (a multiple of seq_len) is emitted in the
    // segment that holds it, so the cost is O(n_segments + n_samples) with one load per segment
    // (plus one gather through doc_idx, done here rather than as a numpy gather before the loop).
    int64_t seg_begin = 0;
    int64_t target = 0;
    int64_t negative = 0;  // OR of every size: its sign bit says one was negative, checked after the loop
    auto size_of = [&](int64_t k) -> int64_t {
        int64_t d = k;
        if constexpr (Gather) {
            d = static_cast<int64_t>(doc_idx[k]);
            if (static_cast<uint64_t>(d) >= static_cast<uint64_t>(n_sizes)) {
                throw std::invalid_argument("build_sample_idx: doc_idx[" + std::to_string(k) + "] = " +
                                            std::to_string(d) + " is out of range [0, " + std::to_string(n_sizes) +
                                            ")");
            }
        }
        return static_cast<int64_t>(sizes[d]);
    };
    // In order, blocks of kBlock segments: the ends are summed first, then each boundary inside the
    // block finds its segment by counting the ends at or before it (no branch). A per-segment "does
    // it hold a boundary?" branch is a coin flip the predictor loses once per sample; per block of 8
    // (about one 8K-token sample) the count is far more regular: 1.23x Megatron's speed instead of
    // 0.92x at 10M documents. Gathering, the per-segment loop below keeps more loads in flight
    // (the block loop measured 0.53x there, the plain loop 1.09x).
    constexpr int kBlock = 8;
    int64_t k = 0;
    for (; !Gather && k + kBlock <= n_segments; k += kBlock) {
        int64_t ends[kBlock + 1];  // ends[0] = block start, ends[j + 1] = end of segment k + j
        ends[0] = seg_begin;
        for (int j = 0; j < kBlock; ++j) {
            const int64_t size = size_of(k + j);
            negative |= size;
            ends[j + 1] = ends[j] + size;
        }
        while (target < ends[kBlock]) {
            int64_t j = 0;
            for (int i = 1; i < kBlock; ++i) j += ends[i] <= target;  // skips empty segments too
            out.push(k + j, target - ends[j]);
            target += seq_len;
        }
        seg_begin = ends[kBlock];
    }
    for (; k < n_segments; ++k) {
        const int64_t size = size_of(k);
        negative |= size;
        const int64_t seg_end = seg_begin + size;
        for (; target < seg_end; target += seq_len) {
            out.push(k, target - seg_begin);
        }
        seg_begin = seg_end;
    }
    if (negative < 0) {
        for (int64_t k = 0; k < n_segments; ++k) {
            const int64_t d = Gather ? static_cast<int64_t>(doc_idx[k]) : k;
            if (sizes[d] < 0) {
                throw std::invalid_argument("build_sample_idx: sizes[" + std::to_string(d) + "] = " +
                                            std::to_string(sizes[d]) + " is negative; sizes are pair counts");
            }
        }
    }
    if (target == seg_begin) {  // a boundary at the very end: (n_segments, 0)
        out.push(n_segments, 0);
    }
    return out.release();
}

}  // namespace

std::vector<int64_t> build_sample_idx(const int64_t* sizes, int64_t n_sizes, int64_t seq_len) {
    const SampleRows rows = build_sample_idx_rows(sizes, n_sizes, seq_len);
    std::vector<int64_t> out(rows.data, rows.data + 2 * rows.n_rows);
    std::free(rows.data);
    return out;
}

SampleRows build_sample_idx_rows(const int64_t* sizes, int64_t n_sizes, int64_t seq_len) {
    return sample_idx_impl<false, int64_t, int64_t>(sizes, n_sizes, nullptr, n_sizes, seq_len);
}

template <typename S, typename D>
SampleRows build_sample_idx_gather(const S* sizes, int64_t n_sizes, const D* doc_idx, int64_t n_segments,
                                   int64_t seq_len) {
    return sample_idx_impl<true, S, D>(sizes, n_sizes, doc_idx, n_segments, seq_len);
}

template SampleRows build_sample_idx_gather(const int32_t*, int64_t, const int32_t*, int64_t, int64_t);
template SampleRows build_sample_idx_gather(const int32_t*, int64_t, const int64_t*, int64_t, int64_t);
template SampleRows build_sample_idx_gather(const int64_t*, int64_t, const int32_t*, int64_t, int64_t);
template SampleRows build_sample_idx_gather(const int64_t*, int64_t, const int64_t*, int64_t, int64_t);

void build_blending_indices(const double* weights, int64_t n_datasets, int64_t* counts, int64_t n_samples,
                            int32_t* dataset_index, int64_t* dataset_sample_index) {
    if (n_datasets < 1) {
        throw std::invalid_argument("build_blending_indices: need at least one dataset");
    }
    if (n_datasets > std::numeric_limits<int32_t>::max()) {
        throw std::invalid_argument("build_blending_indices: too many datasets");
    }
    if (n_samples < 0) {
        throw std::invalid_argument("build_blending_indices: n_samples must be >= 0");
    }
    int64_t start = 0;
    for (int64_t d = 0; d < n_datasets; ++d) {
        if (!std::isfinite(weights[d]) || weights[d] <= 0.0) {
            throw std::invalid_argument("build_blending_indices: weights[" + std::to_string(d) +
                                        "] must be finite and > 0, got " + std::to_string(weights[d]));
        }
        if (counts[d] < 0) {
            throw std::invalid_argument("build_blending_indices: counts[" + std::to_string(d) + "] is negative");
        }
        start += counts[d];
    }
    for (int64_t t = 0; t < n_samples; ++t) {
        const double next = static_cast<double>(start + t + 1);
        int64_t best = 0;
        double best_err = -std::numeric_limits<double>::infinity();
        for (int64_t d = 0; d < n_datasets; ++d) {
            // Rounded product, then subtract, as numpy does: the build passes -ffp-contract=off so no
            // compiler fuses these into an FMA (aarch64 would by default), which could flip a near-tie
            // against the Python fallback. (A volatile did the same and cost ~25% of this loop.)
            const double err = weights[d] * next - static_cast<double>(counts[d]);
            if (err > best_err) {
                best_err = err;
                best = d;
            }
        }
        dataset_index[t] = static_cast<int32_t>(best);
        dataset_sample_index[t] = counts[best];
        counts[best] += 1;
    }
}

}  // namespace llama3hp
