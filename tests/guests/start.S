/*
 * Entry point of the Ember test guests.
 *
 * The VMM enters here in 64-bit long mode (Linux boot protocol, 64-bit boot
 * entry) with RSI = address of boot_params (the zero page), interrupts off
 * and a stack it chose. The guest switches to its own stack, clears .bss
 * (the ELF loader only copies file contents) and calls main(boot_params).
 * If main ever returns, the guest resets the machine.
 */
    .section .text.start, "ax"
    .globl _start
    .type _start, @function
_start:
    cli
    movq    %rsi, %r12              /* keep boot_params across the .bss loop */
    /*
     * One `rep stosq`, as Linux clears its .bss: with interrupts off every
     * instruction may go through KVM's instruction emulator, so a
     * 16 KiB store loop would cost thousands of emulated instructions.
     */
    leaq    __bss_start(%rip), %rdi
    leaq    __bss_end(%rip), %rcx
    subq    %rdi, %rcx
    shrq    $3, %rcx
    xorl    %eax, %eax
    cld
    rep stosq
    leaq    stack_top(%rip), %rsp
    xorl    %ebp, %ebp
    movq    %r12, %rdi
    call    main
    call    reset
3:  hlt
    jmp     3b
    .size _start, . - _start

    .section .note.GNU-stack, "", @progbits

    .section .bss
    .balign 16
stack:
    .skip   16384
stack_top:
