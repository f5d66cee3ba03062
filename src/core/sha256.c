/*
 * sha256.c: SHA-256 (FIPS 180-4) of a buffer, for the weights fingerprint.
 *
 * The fingerprint of a model is the SHA-256 of its weights file, the value
 * `sha256sum pytorch_model.bin` prints and Hugging Face shows for the file,
 * so an operator can check every server against the published file.  It is
 * computed on request (osv_model_fingerprint), never on the inference path.
 *
 * Speed matters all the same: every backend that reports its model (and
 * every server a scale-out job checks) hashes the whole 1.3 GB file.  The
 * portable C rounds run at about 180 MB/s on an AMD Zen 1 core (7 s for
 * the file, as slow as sha256sum); CPUs with the SHA extensions (AMD since
 * Zen, Intel since Ice Lake and Goldmont) run the rounds in hardware,
 * several times faster.  Which one runs is chosen at run time, from CPUID,
 * and both give the same digest (test_pytorch.c checks FIPS 180-4's
 * examples, and the tests compare fingerprints with sha256sum).
 */
#include "internal.h"

#include <cpuid.h>
#include <immintrin.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

static const uint32_t K[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
	0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
	0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
	0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
	0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2
};

static inline uint32_t
ror(uint32_t x, int n)
{
	return (x >> n) | (x << (32 - n));
}

/* Process one 64-byte block into state h. */
static void
block(uint32_t h[8], const uint8_t *p)
{
	uint32_t	w[64];
	uint32_t	a = h[0],
				b = h[1],
				c = h[2],
				d = h[3],
				e = h[4],
				f = h[5],
				g = h[6],
				k = h[7];

	for (int i = 0; i < 16; i++)
		w[i] = ((uint32_t) p[4 * i] << 24) | ((uint32_t) p[4 * i + 1] << 16) |
			((uint32_t) p[4 * i + 2] << 8) | p[4 * i + 3];
	for (int i = 16; i < 64; i++)
	{
		uint32_t	s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
		uint32_t	s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);

		w[i] = w[i - 16] + s0 + w[i - 7] + s1;
	}
	for (int i = 0; i < 64; i++)
	{
		uint32_t	t1 = k + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) +
			K[i] + w[i];
		uint32_t	t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));

		k = g;
		g = f;
		f = e;
		e = d + t1;
		d = c;
		c = b;
		b = a;
		a = t1 + t2;
	}
	h[0] += a;
	h[1] += b;
	h[2] += c;
	h[3] += d;
	h[4] += e;
	h[5] += f;
	h[6] += g;
	h[7] += k;
}

/*
 * The same as block() on n consecutive blocks, with the SHA extensions.
 * The state lives in two registers as the instructions want it, ABEF and
 * CDGH; each sha256rnds2 does two rounds, so the 16 groups of 4 rounds are
 * 32 of them.  Message schedule, for the 4 words of group g >= 4 (words
 * 4g..4g+3), from the four previous groups M[(g+j) % 4], j = 0..3:
 * W[t] = W[t-16] + s0(W[t-15]) (sha256msg1) + W[t-7] (the alignr of the
 * two latest groups) + s1(W[t-2]) (sha256msg2).
 */
__attribute__((target("sha,sse4.1,ssse3")))
static void
blocks_shani(uint32_t h[8], const uint8_t *p, size_t n)
{
	const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
	__m128i		abef,
				cdgh,
				t;

	/* h = a b c d | e f g h  ->  ABEF, CDGH (lane 3 first) */
	t = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *) &h[0]), 0xB1);	/* c d a b */
	cdgh = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *) &h[4]), 0x1B);	/* h g f e */
	abef = _mm_alignr_epi8(t, cdgh, 8);
	cdgh = _mm_blend_epi16(cdgh, t, 0xF0);

	for (; n > 0; n--, p += 64)
	{
		__m128i		m[4];
		__m128i		abef0 = abef,
					cdgh0 = cdgh;

		for (int g = 0; g < 16; g++)
		{
			__m128i		wk;

			if (g < 4)
				m[g] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *) (p + 16 * g)), bswap);
			else
			{
				t = _mm_sha256msg1_epu32(m[g % 4], m[(g + 1) % 4]);
				t = _mm_add_epi32(t, _mm_alignr_epi8(m[(g + 3) % 4], m[(g + 2) % 4], 4));
				m[g % 4] = _mm_sha256msg2_epu32(t, m[(g + 3) % 4]);
			}
			wk = _mm_add_epi32(m[g % 4], _mm_loadu_si128((const __m128i *) &K[4 * g]));
			cdgh = _mm_sha256rnds2_epu32(cdgh, abef, wk);
			abef = _mm_sha256rnds2_epu32(abef, cdgh, _mm_shuffle_epi32(wk, 0x0E));
		}
		abef = _mm_add_epi32(abef, abef0);
		cdgh = _mm_add_epi32(cdgh, cdgh0);
	}

	/* back to a b c d | e f g h */
	t = _mm_shuffle_epi32(abef, 0x1B);		/* f e b a */
	cdgh = _mm_shuffle_epi32(cdgh, 0xB1);	/* d c h g */
	_mm_storeu_si128((__m128i *) &h[0], _mm_blend_epi16(t, cdgh, 0xF0));
	_mm_storeu_si128((__m128i *) &h[4], _mm_alignr_epi8(cdgh, t, 8));
}

/* Whether this CPU has the SHA extensions (and the SSE they use with). */
bool
osv_sha256_hardware(void)
{
	unsigned int a,
				b,
				c,
				d;

	if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_SSE4_1) || !(c & bit_SSSE3))
		return false;
	if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
		return false;
	return (b & bit_SHA) != 0;
}

void
osv_sha256_hex(const uint8_t *buf, size_t size, char hex[65])
{
	osv_sha256_hex_with(buf, size, hex, osv_sha256_hardware());
}

/* SHA-256 with the SHA extensions (hardware; the caller checked) or not. */
void
osv_sha256_hex_with(const uint8_t *buf, size_t size, char hex[65], bool hardware)
{
	uint32_t	h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
		0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
	uint8_t		tail[128];
	size_t		full = size / 64 * 64;
	size_t		rest = size - full;
	size_t		tail_len;
	uint64_t	bits = (uint64_t) size * 8;

	if (full > 0 && hardware)
		blocks_shani(h, buf, full / 64);
	else
		for (size_t off = 0; off < full; off += 64)
			block(h, buf + off);
	memset(tail, 0, sizeof(tail));
	if (rest)
		memcpy(tail, buf + full, rest);
	tail[rest] = 0x80;
	tail_len = rest + 1 + 8 <= 64 ? 64 : 128;
	for (int i = 0; i < 8; i++)
		tail[tail_len - 1 - i] = (uint8_t) (bits >> (8 * i));
	block(h, tail);
	if (tail_len == 128)
		block(h, tail + 64);
	for (int i = 0; i < 8; i++)
		snprintf(hex + 8 * i, 9, "%08x", h[i]);
}
