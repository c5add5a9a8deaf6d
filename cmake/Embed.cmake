# Writes OUT, a C++ file defining `physr::cli::kBuiltinMachines`: the name and text of every
# TOML file under DIR, so built-in machines work from an installed binary.
file(GLOB files "${DIR}/*.toml")
list(SORT files)
set(body "")
foreach(f ${files})
  get_filename_component(name "${f}" NAME_WE)
  file(READ "${f}" text)
  string(APPEND body "    {\"${name}\", R\"physr_embed(${text})physr_embed\"},\n")
endforeach()
file(WRITE "${OUT}.tmp" "// Generated from ${DIR} by cmake/Embed.cmake.\n#include \"builtin.hpp\"\n\nnamespace physr::cli {\nconst std::vector<BuiltinFile> kBuiltinMachines = {\n${body}};\n}  // namespace physr::cli\n")
execute_process(COMMAND ${CMAKE_COMMAND} -E copy_if_different "${OUT}.tmp" "${OUT}")
