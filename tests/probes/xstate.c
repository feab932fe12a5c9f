/*
 * Does a guest keep each task's vector registers its own? Two processes each
 * load a pattern into YMM1, yield the CPU to each other through a syscall
 * and read YMM1 back; a pattern that changed was torn by a task switch.
 * Prints what user mode may use (CPUID.OSXSAVE/AVX and XCR0) and the count
 * of torn patterns; exits 1 if any. A CPU (or guest) that gives user mode no
 * AVX has nothing to tear and passes.
 *
 * Built static by the end-to-end tests (tests/src/rootfs.rs) so that it runs
 * in the busybox image; C because it is a few instructions of inline asm.
 */
#include <cpuid.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static unsigned long long xcr0(void)
{
	unsigned int lo, hi;
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	return ((unsigned long long)hi << 32) | lo;
}

/* Loads `pattern` into YMM1, yields, spins, stores YMM1: torn tries. */
static int torn(unsigned long long pattern, int tries)
{
	int count = 0;
	for (int i = 0; i < tries; i++) {
		unsigned long long in[4] = {pattern, pattern + 1, pattern + 2, pattern + 3};
		unsigned long long out[4];
		long ret;
		__asm__ volatile("vmovdqu (%1), %%ymm1\n\t"
				 "syscall\n\t"
				 "mov $200000, %%ecx\n"
				 "1: dec %%ecx\n\t"
				 "jnz 1b\n\t"
				 "vmovdqu %%ymm1, (%2)"
				 : "=&a"(ret)
				 : "r"(in), "r"(out), "0"((long)SYS_sched_yield)
				 : "rcx", "r11", "xmm1", "memory");
		for (int k = 0; k < 4; k++)
			if (out[k] != in[k]) {
				count++;
				break;
			}
	}
	return count;
}

int main(int argc, char **argv)
{
	int tries = argc > 1 ? atoi(argv[1]) : 100;
	unsigned int a, b, c, d;
	__cpuid(1, a, b, c, d);
	int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
	unsigned long long xcr = osxsave ? xcr0() : 0;
	printf("osxsave=%d avx=%d xcr0=%#llx\n", osxsave, avx, xcr);
	if (!osxsave || !avx || (xcr & 6) != 6) {
		printf("torn=0 (no AVX state in user mode)\n");
		return 0;
	}
	fflush(stdout);
	pid_t child = fork();
	if (child < 0)
		return 2;
	if (child == 0)
		_exit(torn(0xbbbb0000ull, tries) ? 1 : 0);
	int mine = torn(0xaaaa0000ull, tries), status = 0;
	waitpid(child, &status, 0);
	int theirs = WIFEXITED(status) ? WEXITSTATUS(status) : 1;
	printf("torn=%d (parent %d of %d, child %s)\n", mine + theirs, mine, tries,
	       theirs ? "some" : "none");
	return mine + theirs ? 1 : 0;
}
