# Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
#
# The module layering, checked (ctest: Layering). A module's sources (tests excluded) may
# include only headers of the modules it links (CMakeLists.txt) and the public API:
#   format, io, codec, digest, version: themselves only (they know nothing of each other)
#   qcow2: format io codec;  convert: qcow2 digest + below;  backup: convert + below
#   include/zqcow: only include/zqcow
# Every module's include path holds all of src/, so the compiler cannot refuse a wrong
# include; this check does. Run: cmake -DZQCOW_SOURCE_DIR=<tree> -P check_layering.cmake
set(allowed_format format)
set(allowed_io io)
set(allowed_codec codec)
set(allowed_digest digest)
set(allowed_version version)
set(allowed_qcow2 qcow2 format io codec)
set(allowed_convert convert qcow2 digest format io codec)
set(allowed_backup backup convert qcow2 digest format io codec)
set(allowed_zqcow)

set(violations "")
foreach(module format io codec digest version qcow2 convert backup zqcow)
  if(module STREQUAL "zqcow")
    file(GLOB sources ${ZQCOW_SOURCE_DIR}/include/zqcow/*.h)
  else()
    file(GLOB sources ${ZQCOW_SOURCE_DIR}/src/${module}/*.h ${ZQCOW_SOURCE_DIR}/src/${module}/*.cc)
  endif()
  list(FILTER sources EXCLUDE REGEX "_test(_util)?\\.(cc|h)$")
  foreach(source ${sources})
    file(STRINGS ${source} includes REGEX "^#include \"[a-z0-9_]+/")
    foreach(line ${includes})
      string(REGEX REPLACE "^#include \"([a-z0-9_]+)/.*" "\\1" dir "${line}")
      if(dir STREQUAL "zqcow")
        continue()
      endif()
      list(FIND allowed_${module} ${dir} found)
      if(found EQUAL -1)
        file(RELATIVE_PATH relative ${ZQCOW_SOURCE_DIR} ${source})
        list(APPEND violations "${relative}: ${line} (${module} may not include ${dir}/)")
      endif()
    endforeach()
  endforeach()
endforeach()

if(violations)
  list(JOIN violations "\n" text)
  message(FATAL_ERROR "layering violations:\n${text}")
endif()
message(STATUS "layering: ok")
