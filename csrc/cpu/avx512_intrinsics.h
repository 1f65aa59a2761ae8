// Included ahead of every source of an x86 build (setup.py and CMakeLists.txt pass -include). GCC
// 12.1-12.2's AVX/AVX-512 intrinsics pass a deliberately uninitialised "don't care" operand (`__m512 __Y = __Y;`
// in avx512fintrin.h), and -Wmaybe-uninitialized reports it wherever ATen's Vectorized inlines
// them into our code: hundreds of false warnings (GCC bug 105593, fixed in GCC 12.3). GCC takes
// the warning state of the header's own lines, so reading the intrinsics here first, with those
// two warnings off, silences them there alone; our code keeps them.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif
