# Installs cake into a scratch prefix, then configures, builds and runs the
# consumer project against it (find_package), and again with add_subdirectory.
foreach(v SOURCE_DIR WORK_DIR GENERATOR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "run_package_test.cmake needs -D${v}=...")
  endif()
endforeach()
file(REMOVE_RECURSE ${WORK_DIR})

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
endfunction()

# 1. Install the library alone.
run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/lib -G ${GENERATOR}
    -DCAKE_BUILD_TESTS=OFF -DCAKE_BUILD_EXAMPLES=OFF -DCAKE_BUILD_BENCH=OFF -DCAKE_ENABLE_CUDA=OFF
    -DCMAKE_INSTALL_PREFIX=${WORK_DIR}/prefix)
run(${CMAKE_COMMAND} --install ${WORK_DIR}/lib)
if(NOT EXISTS ${WORK_DIR}/prefix/include/cake/cake.hpp)
  message(FATAL_ERROR "install did not put include/cake/cake.hpp into the prefix")
endif()

# 2. find_package(cake CONFIG) from a separate project.
run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/package/consumer -B ${WORK_DIR}/found -G ${GENERATOR}
    -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
run(${CMAKE_COMMAND} --build ${WORK_DIR}/found)
run(${WORK_DIR}/found/consumer)

# 3. add_subdirectory(cake).
run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/package/consumer -B ${WORK_DIR}/subdir -G ${GENERATOR}
    -DCAKE_SOURCE_DIR=${SOURCE_DIR} -DCAKE_ENABLE_CUDA=OFF)
run(${CMAKE_COMMAND} --build ${WORK_DIR}/subdir)
run(${WORK_DIR}/subdir/consumer)
message(STATUS "package test: find_package and add_subdirectory consumers built and ran")
