// The Python module hiera_kernels._C. Importing it loads this library, whose static
// TORCH_LIBRARY_IMPL registrars attach the C++ kernels to the schemas that
// hiera_kernels/library.py defines. Its only Python attribute is the build flag
// WITH_CUDA (whether csrc/cuda was compiled in).
#include <Python.h>

#ifndef HIERA_KERNELS_WITH_CUDA
#define HIERA_KERNELS_WITH_CUDA 0
#endif

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_CUDA", HIERA_KERNELS_WITH_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
