// llama3hp._C: pybind11 wrappers of the CPU index builders (numpy in, numpy out).
//
// Inputs are checked here (rank, dtype kind, length) so a wrong call fails with a message naming
// the argument instead of reading garbage; the compute runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "index_builder.h"

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

py::array_t<int64_t> py_build_sample_idx(const py::array& sizes, int64_t seq_len) {
    auto s = as_1d<int64_t>(sizes, "build_sample_idx", "sizes", 'i');
    std::vector<int64_t> out;
    {
        py::gil_scoped_release release;
        out = llama3hp::build_sample_idx(s.data(), s.shape(0), seq_len);
    }
    const py::ssize_t rows = static_cast<py::ssize_t>(out.size() / 2);
    py::array_t<int64_t> result({rows, static_cast<py::ssize_t>(2)});
    std::copy(out.begin(), out.end(), result.mutable_data());
    return result;
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

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "llama3hp CPU index builders for the packed data loader";
    m.def("build_sample_idx", &py_build_sample_idx, py::arg("sizes"), py::arg("seq_len"),
          "Sample boundaries (segment, offset) -> int64 [n_samples + 1, 2]; sizes are pair counts per segment.");
    m.def("build_blending_indices", &py_build_blending_indices, py::arg("weights"), py::arg("counts"),
          py::arg("n_samples"),
          "Greedy blending -> (dataset_index int32 [n], dataset_sample_index int64 [n], counts_after int64 [d]).");
}
