/*
 * The KVM probe guest (its assembled bytes are in verify.py, _PROBE_SECTOR).
 *
 * A boot sector that goes from real mode to protected mode to long mode with paging, touches
 * every 4 KiB page of 64 MiB twice, and writes 0 to QEMU's isa-debug-exit port (QEMU then exits
 * with status 1). Under TCG it takes well under a second. On hosts where /dev/kvm opens but KVM
 * is broken (nested, no usable EPT), the same work takes far longer or never ends, and Linux
 * never gets through its decompressor: verify uses KVM only when this probe runs faster with KVM
 * than with TCG.
 *
 * Build: as --64 -o p.o kvm_probe.S && ld -m elf_x86_64 -Ttext 0x7c00 --oformat binary -o p.bin p.o
 */
.code16
.globl _start
_start:
  cli
  xorw %ax, %ax
  movw %ax, %ds
  movw %ax, %ss
  movw $0x7c00, %sp
  lgdtl gdt_desc
  movl %cr0, %eax
  orl $1, %eax
  movl %eax, %cr0
  ljmpl $0x08, $pm32
.code32
pm32:
  movw $0x10, %ax
  movw %ax, %ds
  movw %ax, %es
  movw %ax, %ss
  movl $0x1000, %edi
  xorl %eax, %eax
  movl $0xc00, %ecx
  rep stosl
  movl $0x2003, 0x1000
  movl $0x3003, 0x2000
  movl $0x83, 0x3000
  movl %cr4, %eax
  orl $0x20, %eax
  movl %eax, %cr4
  movl $0x1000, %eax
  movl %eax, %cr3
  movl $0xC0000080, %ecx
  rdmsr
  orl $0x100, %eax
  wrmsr
  movl %cr0, %eax
  orl $0x80000000, %eax
  movl %eax, %cr0
  ljmpl $0x18, $lm64
.code64
lm64:
  /* map the first 1 GiB with 2 MiB pages, then touch every 4 KiB page of 64 MiB twice */
  movq $0x3000, %rdi
  movq $0x83, %rax
  movq $512, %rcx
2: movq %rax, (%rdi)
  addq $0x200000, %rax
  addq $8, %rdi
  loop 2b
  movq $2, %rdx
3: movq $0x200000, %rdi
  movq $16384, %rcx
4: movb %cl, (%rdi)
  addq $4096, %rdi
  loop 4b
  decq %rdx
  jnz 3b
  movb $0, %al
  outb %al, $0xf4
1: hlt
  jmp 1b
.align 8
gdt:
  .quad 0
  .quad 0x00cf9a000000ffff
  .quad 0x00cf92000000ffff
  .quad 0x00af9a000000ffff
gdt_desc:
  .word gdt_desc - gdt - 1
  .long gdt
