# Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
#
# The version module (src/version/): the project version, the git commit the build was
# configured from, and the build-time versions of the libraries that have no run-time
# version call.

# ZQCOW_GIT_COMMIT in the environment wins (scripts/package-test builds a copy of the tree
# that has no .git); else `git describe` of the source tree; else "unknown".
if(DEFINED ENV{ZQCOW_GIT_COMMIT} AND NOT "$ENV{ZQCOW_GIT_COMMIT}" STREQUAL "")
  set(ZQCOW_GIT_COMMIT "$ENV{ZQCOW_GIT_COMMIT}")
else()
  set(ZQCOW_GIT_COMMIT "unknown")
  find_package(Git QUIET)
  if(GIT_FOUND AND EXISTS "${PROJECT_SOURCE_DIR}/.git")
    execute_process(COMMAND "${GIT_EXECUTABLE}" describe --always --dirty
                    WORKING_DIRECTORY "${PROJECT_SOURCE_DIR}"
                    OUTPUT_VARIABLE git_describe OUTPUT_STRIP_TRAILING_WHITESPACE
                    RESULT_VARIABLE git_result ERROR_QUIET)
    if(git_result EQUAL 0 AND NOT git_describe STREQUAL "")
      set(ZQCOW_GIT_COMMIT "${git_describe}")
    endif()
  endif()
endif()

set(zqcow_uring_version "${URING_VERSION}")
if(zqcow_uring_version STREQUAL "")
  set(zqcow_uring_version "unknown")
endif()
target_compile_definitions(zqcow_version PRIVATE
  ZQCOW_VERSION="${PROJECT_VERSION}"
  ZQCOW_GIT_COMMIT="${ZQCOW_GIT_COMMIT}"
  ZQCOW_LIBURING_VERSION="${zqcow_uring_version}")
# libnbd is listed once the convert module links it (pkg_check_modules(LIBNBD ...)).
if(LIBNBD_FOUND)
  target_compile_definitions(zqcow_version PRIVATE ZQCOW_LIBNBD_VERSION="${LIBNBD_VERSION}")
endif()
target_include_directories(zqcow_version PRIVATE ${ISAL_INCLUDE_DIR})
target_link_libraries(zqcow_version PUBLIC zqcow_base PRIVATE ZLIB::ZLIB PkgConfig::ZSTD)
