// The Python module hiera_kernels._C. Importing it loads this library, whose static
// TORCH_LIBRARY_IMPL registrars attach the C++ kernels to the schemas that
// hiera_kernels/library.py defines. Its Python attributes: the build flag WITH_CUDA
// (whether csrc/cuda was compiled in), cpu_dispatch() (which build of the CPU kernels
// runs, csrc/cpu/cpu_dispatch.h) and choose_cpu_build() (its rule, for tests).
#include <Python.h>

#include <exception>
#include <string>
#include <vector>

#include "cpu/cpu_dispatch.h"

#ifndef HIERA_KERNELS_WITH_CUDA
#define HIERA_KERNELS_WITH_CUDA 0
#endif

namespace {

PyObject* string_list(const std::vector<std::string>& items) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(items.size()));
  for (size_t i = 0; list != nullptr && i < items.size(); ++i) {
    PyObject* item = PyUnicode_FromString(items[i].c_str());
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

// cpu_dispatch() -> {"path": str, "aten": str, "compiled": [str], "supported": [str],
//                   "missing": [str] (per compiled build, the CPU features it lacks), "note": str}
PyObject* cpu_dispatch(PyObject*, PyObject*) {
  try {
    const hiera_kernels::CpuDispatchInfo& info = hiera_kernels::cpu_dispatch_info();
    PyObject* compiled = string_list(info.compiled);
    PyObject* supported = string_list(info.supported);
    PyObject* missing = string_list(info.missing);
    PyObject* result = nullptr;
    if (compiled != nullptr && supported != nullptr && missing != nullptr) {
      result = Py_BuildValue("{s:s,s:s,s:O,s:O,s:O,s:s}", "path", info.path.c_str(), "aten", info.aten.c_str(),
                             "compiled", compiled, "supported", supported, "missing", missing, "note",
                             info.note.c_str());
    }
    Py_XDECREF(compiled);
    Py_XDECREF(supported);
    Py_XDECREF(missing);
    return result;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

// choose_cpu_build(aten_level: int, supported: [bool]) -> int (the build's row)
PyObject* choose_cpu_build(PyObject*, PyObject* args) {
  int level = 0;
  PyObject* flags = nullptr;
  if (!PyArg_ParseTuple(args, "iO!", &level, &PyList_Type, &flags)) return nullptr;
  std::vector<bool> supported;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(flags); ++i) supported.push_back(PyObject_IsTrue(PyList_GET_ITEM(flags, i)) == 1);
  try {
    return PyLong_FromLong(hiera_kernels::choose_cpu_build(level, supported));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_dispatch", cpu_dispatch, METH_NOARGS,
     "The build of the CPU kernels in use and why: {path, aten, compiled, supported, missing, note}."},
    {"choose_cpu_build", choose_cpu_build, METH_VARARGS,
     "choose_cpu_build(aten_level, supported) -> row: the dispatch rule alone, for tests."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_CUDA", HIERA_KERNELS_WITH_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
