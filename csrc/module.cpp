// Python entry point of unigen._C: importing the module runs the TORCH_LIBRARY registrations
// of the op files linked into it; the module itself exposes nothing.
#include <Python.h>

static struct PyModuleDef unigen_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&unigen_c_module); }
