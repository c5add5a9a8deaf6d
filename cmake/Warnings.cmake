# Every target of physr builds warning-free under g++-12 and clang-14.
add_compile_options(-Wall -Wextra -Werror -Wshadow -Wnon-virtual-dtor -Wold-style-cast
                    -Wcast-align -Woverloaded-virtual -Wimplicit-fallthrough)
# GCC 12 reports -Wrestrict false positives inside libstdc++'s std::string operator+ and
# assign at -O2/-O3 (GCC PR 105329, fixed in GCC 13); the code it flags is the library's.
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
  add_compile_options(-Wno-restrict)
endif()
