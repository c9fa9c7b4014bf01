#include "index_builder.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace llama3hp {

std::vector<int64_t> build_sample_idx(const int64_t* sizes, int64_t n_sizes, int64_t seq_len) {
    if (seq_len < 1) {
        throw std::invalid_argument("build_sample_idx: seq_len must be >= 1, got " + std::to_string(seq_len));
    }
    if (n_sizes < 0) {
        throw std::invalid_argument("build_sample_idx: n_sizes must be >= 0");
    }
    int64_t total = 0;
    for (int64_t k = 0; k < n_sizes; ++k) {
        if (sizes[k] < 0) {
            throw std::invalid_argument("build_sample_idx: sizes[" + std::to_string(k) + "] = " +
                                        std::to_string(sizes[k]) + " is negative; sizes are pair counts");
        }
        total += sizes[k];
    }
    const int64_t n_samples = total / seq_len;
    std::vector<int64_t> out(static_cast<size_t>(2 * (n_samples + 1)));
    // One pass: k walks the segments while the boundary target advances by seq_len, so the cost is
    // O(n_sizes + n_samples) rather than a binary search per sample.
    int64_t k = 0;
    int64_t seg_begin = 0;  // pair index where segment k starts
    for (int64_t i = 0; i <= n_samples; ++i) {
        const int64_t target = i * seq_len;
        while (k < n_sizes && seg_begin + sizes[k] <= target) {
            seg_begin += sizes[k];
            ++k;
        }
        out[2 * i] = k;
        out[2 * i + 1] = (k < n_sizes) ? target - seg_begin : 0;
    }
    return out;
}

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
            // volatile keeps the product rounded on its own: a fused multiply-add (which some
            // compilers emit by default on aarch64) would differ from numpy in the last bit and
            // could flip a near-tie against the Python fallback.
            volatile double target = weights[d] * next;
            const double err = target - static_cast<double>(counts[d]);
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
