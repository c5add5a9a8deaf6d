# physr's modules. Each is one folder src/<module>/ and one public header
# include/physr/<module>.hpp, built as one library: target physr_<module>, alias
# physr::<module>, file libphysr_<module>.a (or .so with PHYSR_SHARED), pkg-config package
# physr-<module>. src/CMakeLists.txt declares every module with one physr_add_module() call,
# in layer order, then calls physr_finish_modules(): the umbrella physr::physr (every
# module; pkg-config physr) and the module graph the layer check (tests/layers/) reads.

option(PHYSR_SHARED "Build the module libraries shared (default: static)" ${BUILD_SHARED_LIBS})

# The pkg-config package (or linker flag, when it starts with '-') of each external target a
# module links; absl::NAME is absl_NAME. A module linking another external target must add it
# here, or its .pc files would not name it.
set(PHYSR_PC_EXTERNAL
  "Threads::Threads=-pthread"
  "tomlplusplus::tomlplusplus=tomlplusplus"
  "PkgConfig::physr_urcu=liburcu-memb"
  "ZLIB::ZLIB=zlib")

# .pc files are relocatable: prefix is found from the .pc file's own folder, so an install
# moved or made with `cmake --install --prefix DIR` needs no --define-variable.
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}")
  set(PHYSR_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
  set(PHYSR_PC_LIBDIR "${CMAKE_INSTALL_LIBDIR}")
else()
  file(RELATIVE_PATH _physr_up "/prefix/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/prefix")
  string(REGEX REPLACE "/$" "" _physr_up "${_physr_up}")
  set(PHYSR_PC_PREFIX "\${pcfiledir}/${_physr_up}")
  set(PHYSR_PC_LIBDIR "\${prefix}/${CMAKE_INSTALL_LIBDIR}")
endif()
if(IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(PHYSR_PC_INCLUDEDIR "${CMAKE_INSTALL_INCLUDEDIR}")
else()
  set(PHYSR_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()

# _physr_pc_external(TARGET VAR): VAR = the pkg-config package or flag of an external target.
function(_physr_pc_external dep var)
  if(dep MATCHES "^absl::(.+)$")
    set(${var} "absl_${CMAKE_MATCH_1}" PARENT_SCOPE)
    return()
  endif()
  foreach(entry IN LISTS PHYSR_PC_EXTERNAL)
    if(entry MATCHES "^([^=]+)=(.+)$" AND CMAKE_MATCH_1 STREQUAL dep)
      set(${var} "${CMAKE_MATCH_2}" PARENT_SCOPE)
      return()
    endif()
  endforeach()
  message(FATAL_ERROR "physr: no pkg-config name for '${dep}': add it to PHYSR_PC_EXTERNAL in ${CMAKE_CURRENT_FUNCTION_LIST_FILE}")
endfunction()

# _physr_write_pc(NAME DESCRIPTION REQUIRES REQUIRES_PRIVATE CFLAGS LIBS LIBS_PRIVATE): writes
# pkgconfig/NAME.pc in the build folder and installs it. Lists are ';'-separated.
function(_physr_write_pc name description requires requires_private cflags libs libs_private)
  set(text "prefix=${PHYSR_PC_PREFIX}\nlibdir=${PHYSR_PC_LIBDIR}\nincludedir=${PHYSR_PC_INCLUDEDIR}\n\n")
  string(APPEND text "Name: ${name}\nDescription: ${description}\nVersion: ${PROJECT_VERSION}\n")
  foreach(field IN ITEMS Requires Requires.private Cflags Libs Libs.private)
    string(TOLOWER "${field}" var)
    string(REPLACE "." "_" var "${var}")
    set(value "${${var}}")
    if(NOT value STREQUAL "")
      if(field MATCHES "^Requires")
        list(JOIN value ", " value)
      else()
        list(JOIN value " " value)
      endif()
      string(APPEND text "${field}: ${value}\n")
    endif()
  endforeach()
  file(CONFIGURE OUTPUT "${PROJECT_BINARY_DIR}/pkgconfig/${name}.pc" CONTENT "${text}" @ONLY)
  install(FILES "${PROJECT_BINARY_DIR}/pkgconfig/${name}.pc" DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
endfunction()

# physr_add_module(NAME module [DESCRIPTION text] SOURCES file... [DEPS dep...] [PRIVATE_DEPS dep...])
#   SOURCES       files in src/<module>/ (private headers may be listed too)
#   DEPS          what the public header needs, linked PUBLIC: modules by name (each added
#                 before this one: dependencies point down) and external targets
#   PRIVATE_DEPS  what only the sources need, linked PRIVATE (modules or external targets)
function(physr_add_module)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "NAME;DESCRIPTION" "SOURCES;DEPS;PRIVATE_DEPS")
  if(NOT arg_NAME OR NOT arg_SOURCES OR arg_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "physr_add_module(NAME module SOURCES ... [DEPS ...] [PRIVATE_DEPS ...]): got ${ARGV}")
  endif()
  set(m ${arg_NAME})
  set(target physr_${m})
  if(NOT arg_DESCRIPTION)
    set(arg_DESCRIPTION "the ${m} module")
  endif()
  get_property(modules GLOBAL PROPERTY PHYSR_MODULES)
  if(m IN_LIST modules)
    message(FATAL_ERROR "physr: module '${m}' added twice")
  endif()
  if(NOT EXISTS "${PROJECT_SOURCE_DIR}/include/physr/${m}.hpp")
    message(FATAL_ERROR "physr: module '${m}' has no public header include/physr/${m}.hpp")
  endif()

  if(PHYSR_SHARED)
    set(type SHARED)
  else()
    set(type STATIC)
  endif()
  list(TRANSFORM arg_SOURCES PREPEND "${PROJECT_SOURCE_DIR}/src/${m}/")
  add_library(${target} ${type} ${arg_SOURCES})
  add_library(physr::${m} ALIAS ${target})
  # The public header, and the headers of its folder include/physr/<module>/ if it has one.
  file(GLOB_RECURSE sub_headers CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/include/physr/${m}/*.hpp")
  target_sources(${target} PUBLIC FILE_SET HEADERS BASE_DIRS "${PROJECT_SOURCE_DIR}/include"
                 FILES "${PROJECT_SOURCE_DIR}/include/physr/${m}.hpp" ${sub_headers})
  target_include_directories(${target} PRIVATE "${PROJECT_SOURCE_DIR}/src")
  target_compile_features(${target} PUBLIC cxx_std_20)
  set_target_properties(${target} PROPERTIES EXPORT_NAME ${m})
  if(PHYSR_SHARED)
    set_target_properties(${target} PROPERTIES
      VERSION ${PROJECT_VERSION} SOVERSION ${PROJECT_VERSION_MAJOR}.${PROJECT_VERSION_MINOR}
      INSTALL_RPATH "$ORIGIN")
  else()
    # Static archives are linked into executables, where initial-exec TLS is valid.
    target_compile_definitions(${target} PRIVATE PHYSR_STATIC_TLS=1)
  endif()

  set(requires "")
  set(requires_private "")
  set(libs "-L\${libdir}" "-lphysr_${m}")
  set(libs_private "")
  set(module_deps "")
  set(module_private_deps "")
  set(external_deps "")
  set(external_private_deps "")
  foreach(scope IN ITEMS PUBLIC PRIVATE)
    if(scope STREQUAL PUBLIC)
      set(deps ${arg_DEPS})
    else()
      set(deps ${arg_PRIVATE_DEPS})
    endif()
    foreach(dep IN LISTS deps)
      if(dep IN_LIST modules)
        target_link_libraries(${target} ${scope} physr_${dep})
        set(pc "physr-${dep} = ${PROJECT_VERSION}")
        if(scope STREQUAL PUBLIC)
          list(APPEND module_deps ${dep})
        else()
          list(APPEND module_private_deps ${dep})
        endif()
      elseif(dep MATCHES "::" AND TARGET ${dep})
        target_link_libraries(${target} ${scope} ${dep})
        _physr_pc_external(${dep} pc)
        if(scope STREQUAL PUBLIC)
          list(APPEND external_deps ${dep})
        else()
          list(APPEND external_private_deps ${dep})
        endif()
      else()
        message(FATAL_ERROR "physr: module '${m}' depends on '${dep}', which is neither a module added before it "
                            "(${modules}) nor a target")
      endif()
      if(pc MATCHES "^-" AND scope STREQUAL PUBLIC)
        list(APPEND libs "${pc}")
      elseif(pc MATCHES "^-")
        list(APPEND libs_private "${pc}")
      elseif(scope STREQUAL PUBLIC)
        list(APPEND requires "${pc}")
      else()
        list(APPEND requires_private "${pc}")
      endif()
    endforeach()
  endforeach()
  set(cflags "-I\${includedir}")
  if(NOT module_deps AND NOT module_private_deps)
    list(APPEND cflags "-std=c++20")  # the bottom module: every other one requires it
  endif()
  _physr_write_pc(physr-${m} "physr ${m}: ${arg_DESCRIPTION}" "${requires}" "${requires_private}" "${cflags}"
                  "${libs}" "${libs_private}")

  install(TARGETS ${target} EXPORT physrTargets
          ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
          LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
          RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
          FILE_SET HEADERS DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
          INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
  set_property(GLOBAL APPEND PROPERTY PHYSR_MODULES ${m})
  set_property(GLOBAL PROPERTY PHYSR_MODULE_${m}_DEPS "${module_deps}")
  set_property(GLOBAL PROPERTY PHYSR_MODULE_${m}_PRIVATE_DEPS "${module_private_deps}")
  set_property(GLOBAL PROPERTY PHYSR_MODULE_${m}_EXTERNAL "${external_deps}")
  set_property(GLOBAL PROPERTY PHYSR_MODULE_${m}_PRIVATE_EXTERNAL "${external_private_deps}")
endfunction()

# physr_finish_modules(): after the last physr_add_module(). Adds the umbrella target physr
# (physr::physr: every module) and its pkg-config package physr, writes the module graph
# to ${PROJECT_BINARY_DIR}/physr-modules.txt for the layer check, and sets the global
# property PHYSR_CONFIG_GRAPH to the graph as physrConfig.cmake reads it: per module its
# modules (public and private) and its external targets (public and private).
function(physr_finish_modules)
  get_property(modules GLOBAL PROPERTY PHYSR_MODULES)
  add_library(physr INTERFACE)
  add_library(physr::physr ALIAS physr)
  set(requires "")
  foreach(m IN LISTS modules)
    target_link_libraries(physr INTERFACE physr_${m})
    list(APPEND requires "physr-${m} = ${PROJECT_VERSION}")
  endforeach()
  install(TARGETS physr EXPORT physrTargets)
  _physr_write_pc(physr "${PROJECT_DESCRIPTION} (every module)" "${requires}" "" "" "" "")

  set(graph "# physr's modules in layer order, as src/CMakeLists.txt declares them:\n")
  string(APPEND graph "# module: public module deps | private module deps\n")
  foreach(m IN LISTS modules)
    get_property(deps GLOBAL PROPERTY PHYSR_MODULE_${m}_DEPS)
    get_property(private GLOBAL PROPERTY PHYSR_MODULE_${m}_PRIVATE_DEPS)
    list(JOIN deps " " deps)
    list(JOIN private " " private)
    string(STRIP "${m}: ${deps} | ${private}" line)
    string(REPLACE "  " " " line "${line}")
    string(APPEND graph "${line}\n")
  endforeach()
  file(CONFIGURE OUTPUT "${PROJECT_BINARY_DIR}/physr-modules.txt" CONTENT "${graph}" @ONLY)

  set(config "")
  foreach(m IN LISTS modules)
    foreach(kind IN ITEMS DEPS PRIVATE_DEPS EXTERNAL PRIVATE_EXTERNAL)
      get_property(value GLOBAL PROPERTY PHYSR_MODULE_${m}_${kind})
      string(TOLOWER "${kind}" var)
      string(APPEND config "set(_physr_${m}_${var} \"${value}\")\n")
    endforeach()
  endforeach()
  set_property(GLOBAL PROPERTY PHYSR_CONFIG_GRAPH "${config}")
endfunction()
