# Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
#
# What `cmake --install` installs: the zqcow CLI, libzqcow (shared, SONAME libzqcow.so.0,
# and static) built from the objects of every module, the public headers, a CMake package
# (find_package(zqcow) -> zqcow::zqcow), zqcow.pc, the manual pages and bash completion.
#
# A module joins the library by being declared with zqcow_module(NAME) before this file
# is included; its private dependencies (target_link_libraries(zqcow_NAME PRIVATE ...))
# follow it into libzqcow.so. For the static library, list their pkg-config names in
# ZQCOW_PC_REQUIRES_PRIVATE (libzqcow-dev's Depends in debian/control has the packages).

set(ZQCOW_SOVERSION 0)
# pkg-config modules the static library needs (zqcow.pc Requires.private).
set(ZQCOW_PC_REQUIRES_PRIVATE zlib libzstd liburing libisal libnbd fmt)

get_property(zqcow_modules GLOBAL PROPERTY ZQCOW_MODULES)
add_library(zqcow_shared SHARED)
add_library(zqcow_static STATIC)
foreach(kind shared static)
  set(target zqcow_${kind})
  foreach(module ${zqcow_modules})
    target_sources(${target} PRIVATE $<TARGET_OBJECTS:${module}>)
  endforeach()
  set_target_properties(${target} PROPERTIES OUTPUT_NAME zqcow EXPORT_NAME zqcow)
  target_include_directories(${target} INTERFACE
    $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/include>
    $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
  target_compile_features(${target} INTERFACE cxx_std_20)
endforeach()
# The modules' own dependencies (zlib, zstd, ISA-L, liburing, fmt, threads, ...) are private
# to libzqcow.so: what each module links, other modules left out.
foreach(module ${zqcow_modules})
  target_link_libraries(zqcow_shared PRIVATE
    "$<FILTER:$<TARGET_PROPERTY:${module},LINK_LIBRARIES>,EXCLUDE,^zqcow_>")
endforeach()
# Only zqcow:: symbols leave the library: hidden visibility hides the internals, the version
# script (cmake/libzqcow.map) also the std:: template instances the library compiled.
set(zqcow_version_script ${PROJECT_SOURCE_DIR}/cmake/libzqcow.map)
set_target_properties(zqcow_shared PROPERTIES
  VERSION ${PROJECT_VERSION} SOVERSION ${ZQCOW_SOVERSION}
  LINK_DEPENDS ${zqcow_version_script})
target_link_options(zqcow_shared PRIVATE "LINKER:--version-script=${zqcow_version_script}")
# Every dependency is linked (clang's sanitizer runtimes live in the executable: not there).
if(ZQCOW_SANITIZE STREQUAL "" AND NOT ZQCOW_BUILD_FUZZ)
  target_link_options(zqcow_shared PRIVATE "LINKER:--no-undefined")
endif()
add_library(zqcow::zqcow ALIAS zqcow_shared)

install(TARGETS zqcow RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(TARGETS zqcow_shared EXPORT zqcowTargets LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(TARGETS zqcow_static ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(DIRECTORY include/zqcow DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
  FILES_MATCHING PATTERN "*.h")

# CMake package.
include(CMakePackageConfigHelpers)
set(zqcow_cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/zqcow)
install(EXPORT zqcowTargets NAMESPACE zqcow:: DESTINATION ${zqcow_cmake_dir})
configure_package_config_file(cmake/zqcowConfig.cmake.in
  ${PROJECT_BINARY_DIR}/zqcowConfig.cmake INSTALL_DESTINATION ${zqcow_cmake_dir})
# 0.x: a new minor version may change the interface (and then the SONAME).
write_basic_package_version_file(${PROJECT_BINARY_DIR}/zqcowConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/zqcowConfig.cmake ${PROJECT_BINARY_DIR}/zqcowConfigVersion.cmake
  DESTINATION ${zqcow_cmake_dir})

# pkg-config: zqcow.pc is written when installing, so that its prefix is the one installed
# to (cmake --install --prefix).
list(JOIN ZQCOW_PC_REQUIRES_PRIVATE " " zqcow_pc_requires_private)
install(CODE "
  set(zqcow_pc_prefix \"\${CMAKE_INSTALL_PREFIX}\")
  set(zqcow_pc_libdir \"${CMAKE_INSTALL_LIBDIR}\")
  set(zqcow_pc_includedir \"${CMAKE_INSTALL_INCLUDEDIR}\")
  set(zqcow_pc_requires_private \"${zqcow_pc_requires_private}\")
  set(PROJECT_VERSION \"${PROJECT_VERSION}\")
  foreach(dir zqcow_pc_libdir zqcow_pc_includedir)
    if(NOT IS_ABSOLUTE \"\${\${dir}}\")
      set(\${dir} \"\\\${prefix}/\${\${dir}}\")
    endif()
  endforeach()
  configure_file(\"${PROJECT_SOURCE_DIR}/cmake/zqcow.pc.in\" \"${PROJECT_BINARY_DIR}/zqcow.pc\" @ONLY)
")
install(FILES ${PROJECT_BINARY_DIR}/zqcow.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)

# Manual pages: zqcow(1) and zqcow-SUBCOMMAND(1), made by help2man from the built binary's
# --help (the subcommands are read from `zqcow --help`), so they say what --help says.
# Not in the sanitizer and fuzz builds, which are never installed (and whose binary might
# report a leak at exit).
find_program(HELP2MAN_PROGRAM help2man)
if(HELP2MAN_PROGRAM AND ZQCOW_SANITIZE STREQUAL "" AND NOT ZQCOW_BUILD_FUZZ)
  set(zqcow_man_dir ${PROJECT_BINARY_DIR}/man)
  add_custom_command(OUTPUT ${zqcow_man_dir}/stamp
    COMMAND ${PROJECT_SOURCE_DIR}/cmake/make-man-pages ${HELP2MAN_PROGRAM} $<TARGET_FILE:zqcow>
            ${PROJECT_VERSION} ${zqcow_man_dir}
    DEPENDS zqcow ${PROJECT_SOURCE_DIR}/cmake/make-man-pages
    COMMENT "Generating manual pages with help2man" VERBATIM)
  add_custom_target(zqcow_man ALL DEPENDS ${zqcow_man_dir}/stamp)
  install(DIRECTORY ${zqcow_man_dir}/ DESTINATION ${CMAKE_INSTALL_MANDIR}/man1
    FILES_MATCHING PATTERN "*.1")
elseif(NOT HELP2MAN_PROGRAM)
  message(STATUS "help2man not found: no manual pages (scripts/setup installs it)")
endif()

# Bash completion, where bash-completion looks for it (completions/<command>, loaded on
# first use).
install(FILES contrib/bash-completion/zqcow
  DESTINATION ${CMAKE_INSTALL_DATADIR}/bash-completion/completions)
