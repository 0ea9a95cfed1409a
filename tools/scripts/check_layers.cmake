# Fails when a file includes a header of a layer above its own, or of a sibling layer
# (docs/architecture.md). Run by the build (target kvmem_layer_check) and by hand:
#   cmake -DROOT=<repository> -P tools/scripts/check_layers.cmake
# Includes are written from the repository root, so the folder of an include names its
# layer. A file may include its own folder and the folders listed for it.
if(NOT DEFINED ROOT)
  message(FATAL_ERROR "usage: cmake -DROOT=<repository> -P check_layers.cmake")
endif()

set(public "kvmem/[a-z_]+\\.h")
set(core "src/core/")
set(vmm "allocators/vmm/")
set(layout "allocators/layout/")

# folder | what its files may include besides their own folder (regexes on the path,
# separated by commas)
set(rules
    "include/kvmem|${public}"
    "include/kvmem/testing|${public}"
    "include/kvmem/debug|${public}"
    "src/core|${public},${core}"
    "allocators/vmm|${public},${core}"
    "allocators/testing|${public},kvmem/testing/,${core},${vmm}"
    "allocators/layout|${public},${core},${vmm}"
    "allocators/paged|${public},${core},${vmm},${layout}"
    "allocators/virtual|${public},${core},${vmm},${layout}"
    "src/cache|${public},${core},${layout}"
    "src/c_api|${public}"
    "attention|${public},kvmem/debug/,${core}"
    "tools/kvstress|${public}"
    "tools/kvbench|${public},kvmem/debug/")

set(bad "")
foreach(rule ${rules})
  string(REPLACE "|" ";" parts "${rule}")
  list(GET parts 0 dir)
  list(GET parts 1 allowed)
  string(REPLACE "," ";" allowed "${allowed}")
  list(APPEND allowed "${dir}/")
  file(GLOB files ${ROOT}/${dir}/*.h ${ROOT}/${dir}/*.cc ${ROOT}/${dir}/*.cu ${ROOT}/${dir}/*.cuh)
  foreach(f ${files})
    file(STRINGS ${f} lines REGEX "^#include \"")
    foreach(line ${lines})
      string(REGEX REPLACE "^#include \"([^\"]+)\".*" "\\1" inc "${line}")
      # Third-party headers (absl/, spdlog/, gtest/, cuda) are not layers.
      if(NOT inc MATCHES "^(kvmem|src|allocators|attention|tools|tests)/")
        continue()
      endif()
      set(ok FALSE)
      foreach(a ${allowed})
        if(inc MATCHES "^${a}")
          set(ok TRUE)
        endif()
      endforeach()
      # A header of the public folder itself ("kvmem/x.h") is not a test or debug one.
      if(dir STREQUAL "include/kvmem" AND NOT inc MATCHES "^${public}$")
        set(ok FALSE)
      endif()
      if(NOT ok)
        file(RELATIVE_PATH rel ${ROOT} ${f})
        string(APPEND bad "\n  ${rel}: #include \"${inc}\" is not below ${dir}")
      endif()
    endforeach()
  endforeach()
endforeach()

if(bad)
  message(FATAL_ERROR "includes that run against the layers (docs/architecture.md):${bad}")
endif()
