// Index builders for the packed data loader (llama3hp.data.indices).
//
// Plain C++17 with no Python, torch or CUDA dependency: the pybind11 module in bindings.cpp wraps
// these functions for Python, and test_index_builder.cpp drives them directly under ctest.
// Both functions must give bit-identical results to the numpy fallbacks in
// llama3hp/data/indices.py (the tests cross-check them on random inputs).
#pragma once

#include <cstdint>
#include <vector>

namespace llama3hp {

// Sample boundaries over a sequence of segments holding sizes[k] (input, target) pairs each.
//
// Sample i covers pairs [i*seq_len, (i+1)*seq_len) of the concatenated segments; there are
// n_samples = sum(sizes) / seq_len samples (the remainder is left for the caller to carry).
// Returns (n_samples + 1) * 2 int64 values, row i = (k, o): the segment position k and the offset o
// inside it of pair i*seq_len, where k is the first segment whose end lies beyond that pair
// (so empty segments are skipped); the row for a boundary equal to the total is (n_sizes, 0).
// Throws std::invalid_argument on seq_len < 1 or a negative size.
std::vector<int64_t> build_sample_idx(const int64_t* sizes, int64_t n_sizes, int64_t seq_len);

// The same rows in a malloc'ed buffer of n_rows * 2 values that the caller frees with std::free
// (the Python binding hands it to numpy without a copy).
struct SampleRows {
    int64_t* data;
    int64_t n_rows;
};
SampleRows build_sample_idx_rows(const int64_t* sizes, int64_t n_sizes, int64_t seq_len);

// The same over segments k = 0..n_segments-1 of size sizes[doc_idx[k]] (documents in a shuffled
// order), gathering inside the loop. S and D are int32_t or int64_t (explicitly instantiated).
// Also throws on a doc_idx entry outside [0, n_sizes).
template <typename S, typename D>
SampleRows build_sample_idx_gather(const S* sizes, int64_t n_sizes, const D* doc_idx, int64_t n_segments,
                                   int64_t seq_len);

// Greedy blending of n_samples global samples over n_datasets weighted datasets.
//
// counts (in/out, n_datasets values) holds the samples each dataset has already received; the
// global position of the first new sample is their sum. Sample j goes to the dataset whose
// realised count lags its target weights[d] * (j + 1) the most (ties to the lowest index);
// dataset_index[t] receives that dataset and dataset_sample_index[t] its per-dataset counter.
// Weights must be finite and positive (the caller normalises them to sum to one).
// Throws std::invalid_argument on bad weights, negative counts or n_datasets < 1.
void build_blending_indices(const double* weights, int64_t n_datasets, int64_t* counts, int64_t n_samples,
                            int32_t* dataset_index, int64_t* dataset_sample_index);

}  // namespace llama3hp
