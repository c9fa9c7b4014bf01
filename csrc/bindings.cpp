// llama3hp._C: pybind11 wrappers of the CPU index builders and MinHash signatures (numpy in, numpy out).
//
// Inputs are checked here (rank, dtype kind, length) so a wrong call fails with a message naming
// the argument instead of reading garbage; the compute runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "index_builder.h"
#include "minhash.h"

namespace py = pybind11;

namespace {

template <typename T>
py::array_t<T, py::array::c_style> as_1d(const py::array& a, const char* fn, const char* name, char kind) {
    if (a.ndim() != 1) {
        throw py::value_error(std::string(fn) + ": " + name + " must be 1-D, got ndim=" + std::to_string(a.ndim()));
    }
    const char k = a.dtype().kind();
    const bool ok = (kind == 'i') ? (k == 'i' || k == 'u') : (k == 'f' || k == 'i' || k == 'u');
    if (!ok) {
        throw py::value_error(std::string(fn) + ": " + name + " must have an " +
                              (kind == 'i' ? "integer" : "numeric") + " dtype, got '" +
                              std::string(py::str(a.dtype())) + "'");
    }
    return py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(a);
}

// The index as a numpy [rows, 2] array that owns the builder's buffer (no copy).
py::array_t<int64_t> as_rows(llama3hp::SampleRows rows) {
    py::capsule owner(rows.data, [](void* p) { std::free(p); });
    return py::array_t<int64_t>({static_cast<py::ssize_t>(rows.n_rows), static_cast<py::ssize_t>(2)}, rows.data,
                                owner);
}

bool is_int32(const py::array& a) { return a.dtype().is(py::dtype::of<int32_t>()); }

template <typename S>
llama3hp::SampleRows gather_with(const py::array_t<S, py::array::c_style>& s, const py::array& doc_idx,
                                 int64_t seq_len) {
    if (is_int32(doc_idx)) {
        auto d = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(doc_idx);
        py::gil_scoped_release release;
        return llama3hp::build_sample_idx_gather(s.data(), s.shape(0), d.data(), d.shape(0), seq_len);
    }
    auto d = as_1d<int64_t>(doc_idx, "build_sample_idx", "doc_idx", 'i');
    py::gil_scoped_release release;
    return llama3hp::build_sample_idx_gather(s.data(), s.shape(0), d.data(), d.shape(0), seq_len);
}

py::array_t<int64_t> py_build_sample_idx(const py::array& sizes, int64_t seq_len, const py::object& doc_idx) {
    if (doc_idx.is_none()) {
        auto s = as_1d<int64_t>(sizes, "build_sample_idx", "sizes", 'i');
        llama3hp::SampleRows rows;
        {
            py::gil_scoped_release release;
            rows = llama3hp::build_sample_idx_rows(s.data(), s.shape(0), seq_len);
        }
        return as_rows(rows);
    }
    const py::array d = py::array::ensure(doc_idx);
    if (!d || d.ndim() != 1 || (d.dtype().kind() != 'i' && d.dtype().kind() != 'u')) {
        throw py::value_error("build_sample_idx: doc_idx must be a 1-D integer array or None");
    }
    // int32 sizes stay int32 (half the bytes the gather touches, as Megatron's helpers read them).
    if (sizes.ndim() == 1 && is_int32(sizes)) {
        auto s = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(sizes);
        return as_rows(gather_with<int32_t>(s, d, seq_len));
    }
    auto s = as_1d<int64_t>(sizes, "build_sample_idx", "sizes", 'i');
    return as_rows(gather_with<int64_t>(s, d, seq_len));
}

py::tuple py_build_blending_indices(const py::array& weights, const py::array& counts, int64_t n_samples) {
    auto w = as_1d<double>(weights, "build_blending_indices", "weights", 'f');
    auto c_in = as_1d<int64_t>(counts, "build_blending_indices", "counts", 'i');
    if (w.shape(0) != c_in.shape(0)) {
        throw py::value_error("build_blending_indices: weights has " + std::to_string(w.shape(0)) +
                              " entries but counts has " + std::to_string(c_in.shape(0)) + "; give one per dataset");
    }
    if (n_samples < 0) {
        throw py::value_error("build_blending_indices: n_samples must be >= 0, got " + std::to_string(n_samples));
    }
    py::array_t<int64_t> c_out(c_in.shape(0));
    std::copy(c_in.data(), c_in.data() + c_in.shape(0), c_out.mutable_data());
    py::array_t<int32_t> ds_idx(n_samples);
    py::array_t<int64_t> ds_sample(n_samples);
    {
        py::gil_scoped_release release;
        llama3hp::build_blending_indices(w.data(), w.shape(0), c_out.mutable_data(), n_samples, ds_idx.mutable_data(),
                                         ds_sample.mutable_data());
    }
    return py::make_tuple(ds_idx, ds_sample, c_out);
}

py::tuple py_minhash_signatures(const py::array& text, const py::array& offsets, int n_gram, const py::array& a,
                                const py::array& b) {
    if (text.ndim() != 1 || text.dtype().itemsize() != 1) {
        throw py::value_error("minhash_signatures: text must be a 1-D uint8 array of UTF-8 bytes");
    }
    auto t = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>::ensure(text);
    auto off = as_1d<int64_t>(offsets, "minhash_signatures", "offsets", 'i');
    auto pa = as_1d<uint64_t>(a, "minhash_signatures", "a", 'i');
    auto pb = as_1d<uint64_t>(b, "minhash_signatures", "b", 'i');
    if (pa.shape(0) != pb.shape(0) || pa.shape(0) < 1) {
        throw py::value_error("minhash_signatures: a and b must have the same length >= 1 (one per permutation)");
    }
    const int64_t n_docs = off.shape(0) - 1;
    if (n_docs < 0) throw py::value_error("minhash_signatures: offsets needs n_docs + 1 entries");
    const int64_t* o = off.data();
    for (int64_t d = 0; d < n_docs; ++d) {
        if (o[d] < 0 || o[d] > o[d + 1] || o[d + 1] > t.shape(0)) {
            throw py::value_error("minhash_signatures: offsets must rise within the text, bad at document " +
                                  std::to_string(d));
        }
    }
    const int n_perm = static_cast<int>(pa.shape(0));
    py::array_t<uint32_t> sig({static_cast<py::ssize_t>(n_docs), static_cast<py::ssize_t>(n_perm)});
    py::array_t<int64_t> n_shingles(n_docs);
    {
        py::gil_scoped_release release;
        llama3hp::minhash_signatures(t.data(), o, n_docs, n_gram, pa.data(), pb.data(), n_perm, sig.mutable_data(),
                                     n_shingles.mutable_data());
    }
    return py::make_tuple(sig, n_shingles);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "llama3hp CPU helpers: index builders for the packed loader, MinHash for curation";
    m.def("build_sample_idx", &py_build_sample_idx, py::arg("sizes"), py::arg("seq_len"),
          py::arg("doc_idx") = py::none(),
          "Sample boundaries (segment, offset) -> int64 [n_samples + 1, 2]; segment k holds sizes[k] pairs, "
          "or sizes[doc_idx[k]] when doc_idx is given.");
    m.def("build_blending_indices", &py_build_blending_indices, py::arg("weights"), py::arg("counts"),
          py::arg("n_samples"),
          "Greedy blending -> (dataset_index int32 [n], dataset_sample_index int64 [n], counts_after int64 [d]).");
    m.def("minhash_signatures", &py_minhash_signatures, py::arg("text"), py::arg("offsets"), py::arg("n_gram"),
          py::arg("a"), py::arg("b"),
          "MinHash of word n-gram shingles -> (signatures uint32 [n_docs, n_perm], shingle counts int64 [n_docs]).");
}
