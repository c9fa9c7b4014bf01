// Standalone checks of the index builders (no Python): run by ctest via CMakeLists.txt.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "index_builder.h"

namespace {

int failures = 0;

void check(bool ok, const char* what) {
    if (!ok) {
        std::fprintf(stderr, "FAIL: %s\n", what);
        ++failures;
    }
}

template <typename F>
bool throws_invalid_argument(F f) {
    try {
        f();
    } catch (const std::invalid_argument&) {
        return true;
    }
    return false;
}

void test_sample_idx() {
    // Segments of 3, 0, 5, 2 pairs; seq_len 3 -> 3 samples with boundaries at pairs 0, 3, 6, 9.
    const std::vector<int64_t> sizes = {3, 0, 5, 2};
    const auto out = llama3hp::build_sample_idx(sizes.data(), 4, 3);
    const std::vector<int64_t> expect = {0, 0, 2, 0, 2, 3, 3, 1};
    check(out == expect, "sample_idx boundaries skip empty segments and carry offsets");

    // A total that is an exact multiple ends on (n_sizes, 0).
    const std::vector<int64_t> even = {2, 2};
    const auto out2 = llama3hp::build_sample_idx(even.data(), 2, 2);
    const std::vector<int64_t> expect2 = {0, 0, 1, 0, 2, 0};
    check(out2 == expect2, "sample_idx exact multiple ends past the last segment");

    const auto none = llama3hp::build_sample_idx(sizes.data(), 4, 100);
    check(none.size() == 2 && none[0] == 0 && none[1] == 0, "sample_idx with fewer pairs than seq_len has no samples");

    // Gathering sizes[doc_idx[k]] inside the loop equals building over the gathered sizes.
    const std::vector<int32_t> sizes32 = {5, 2, 3, 0};
    const std::vector<int32_t> doc_idx = {3, 2, 0, 1};  // gathered: 0, 3, 5, 2 pairs
    const std::vector<int64_t> gathered = {0, 3, 5, 2};
    const auto rows = llama3hp::build_sample_idx_gather(sizes32.data(), 4, doc_idx.data(), 4, int64_t{3});
    const std::vector<int64_t> got(rows.data, rows.data + 2 * rows.n_rows);
    std::free(rows.data);
    check(got == llama3hp::build_sample_idx(gathered.data(), 4, 3), "gathered sample_idx equals the gathered sizes'");
    const std::vector<int32_t> bad_idx = {0, 4};
    check(throws_invalid_argument(
              [&] { llama3hp::build_sample_idx_gather(sizes32.data(), 4, bad_idx.data(), 2, int64_t{3}); }),
          "doc_idx out of range rejected");

    check(throws_invalid_argument([&] { llama3hp::build_sample_idx(sizes.data(), 4, 0); }), "seq_len 0 rejected");
    const std::vector<int64_t> bad = {1, -1};
    check(throws_invalid_argument([&] { llama3hp::build_sample_idx(bad.data(), 2, 1); }), "negative size rejected");
}

void test_blending() {
    const std::vector<double> w = {0.5, 0.25, 0.25};
    std::vector<int64_t> counts = {0, 0, 0};
    std::vector<int32_t> ds(8);
    std::vector<int64_t> sample(8);
    llama3hp::build_blending_indices(w.data(), 3, counts.data(), 8, ds.data(), sample.data());
    check(counts[0] == 4 && counts[1] == 2 && counts[2] == 2, "blending hits the weights exactly at 8 samples");
    check(ds[0] == 0, "first sample goes to the heaviest dataset");
    std::vector<int64_t> seen = {0, 0, 0};
    for (int t = 0; t < 8; ++t) {
        check(sample[t] == seen[ds[t]], "per-dataset counters are consecutive");
        seen[ds[t]] += 1;
    }

    // Continuing from saved counts equals one long call.
    std::vector<int64_t> c_all = {0, 0, 0};
    std::vector<int32_t> ds_all(20);
    std::vector<int64_t> s_all(20);
    llama3hp::build_blending_indices(w.data(), 3, c_all.data(), 20, ds_all.data(), s_all.data());
    std::vector<int64_t> c_part = {0, 0, 0};
    std::vector<int32_t> ds_a(7), ds_b(13);
    std::vector<int64_t> s_a(7), s_b(13);
    llama3hp::build_blending_indices(w.data(), 3, c_part.data(), 7, ds_a.data(), s_a.data());
    llama3hp::build_blending_indices(w.data(), 3, c_part.data(), 13, ds_b.data(), s_b.data());
    bool same = true;
    for (int t = 0; t < 20; ++t) {
        const int32_t d = t < 7 ? ds_a[t] : ds_b[t - 7];
        const int64_t s = t < 7 ? s_a[t] : s_b[t - 7];
        same = same && d == ds_all[t] && s == s_all[t];
    }
    check(same, "blending resumes from counts");

    const std::vector<double> bad = {0.5, 0.0};
    std::vector<int64_t> c2 = {0, 0};
    check(throws_invalid_argument([&] {
              llama3hp::build_blending_indices(bad.data(), 2, c2.data(), 1, ds.data(), sample.data());
          }),
          "zero weight rejected");
    check(throws_invalid_argument([&] {
              llama3hp::build_blending_indices(w.data(), 0, c2.data(), 1, ds.data(), sample.data());
          }),
          "no datasets rejected");
}

}  // namespace

int main() {
    test_sample_idx();
    test_blending();
    if (failures == 0) {
        std::printf("index_builder: all checks passed\n");
        return 0;
    }
    std::fprintf(stderr, "index_builder: %d check(s) failed\n", failures);
    return 1;
}
