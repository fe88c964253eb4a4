/* How the extensions were built (kernels/_build_info.pyx). setup.py defines FASTDL_OPENMP to 1 or 0
   for every extension; a build without setup.py's flags counts as serial. */
#ifndef FASTDL_BUILD_INFO_H
#define FASTDL_BUILD_INFO_H
#ifndef FASTDL_OPENMP
#define FASTDL_OPENMP 0
#endif
#endif /* FASTDL_BUILD_INFO_H */
