package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
)

// Magic numbers of the payload compressions a bzImage may hold.
var (
	xzMagic   = []byte{0xFD, '7', 'z', 'X', 'Z', 0x00}
	gzipMagic = []byte{0x1f, 0x8b, 0x08}
)

// extractVmlinux returns the uncompressed ELF kernel inside a bzImage. The
// payload is found by its compression's magic number (Debian's kernels are
// xz-compressed with the x86 BCJ filter, which only xz(1) decodes); every
// candidate is tried until one decompresses to an ELF with a PVH entry.
func extractVmlinux(ctx context.Context, bz []byte) ([]byte, error) {
	var errs []error
	try := func(magic []byte, decode func([]byte) ([]byte, error)) []byte {
		for off := 0; ; {
			i := bytes.Index(bz[off:], magic)
			if i < 0 {
				return nil
			}
			off += i
			out, err := decode(bz[off:])
			if err == nil {
				err = checkPVH(out)
			}
			if err == nil {
				return out
			}
			errs = append(errs, fmt.Errorf("payload at %d: %w", off, err))
			off++
		}
	}
	if out := try(xzMagic, func(b []byte) ([]byte, error) { return unxz(ctx, b) }); out != nil {
		return out, nil
	}
	if out := try(gzipMagic, gunzip); out != nil {
		return out, nil
	}
	if len(errs) == 0 {
		return nil, errors.New("no xz or gzip payload in the kernel image")
	}
	return nil, fmt.Errorf("no bootable payload in the kernel image: %w", errors.Join(errs...))
}

func unxz(ctx context.Context, b []byte) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "xz", "--decompress", "--stdout", "--single-stream")
	cmd.Stdin = bytes.NewReader(b)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("xz: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return out.Bytes(), nil
}

func gunzip(b []byte) ([]byte, error) {
	r, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	r.Multistream(false)
	return io.ReadAll(r)
}

// xenElfnotePhys32Entry is the ELF note (owner "Xen") that gives the
// 32-bit PVH entry point QEMU and Firecracker boot an ELF kernel through.
const xenElfnotePhys32Entry = 18

// checkPVH checks that b is an x86-64 ELF kernel with a PVH entry note.
func checkPVH(b []byte) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("malformed ELF: %v", r)
		}
	}()
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		return err
	}
	if f.Machine != elf.EM_X86_64 || f.Type != elf.ET_EXEC {
		return fmt.Errorf("not an x86-64 executable ELF (%v %v)", f.Machine, f.Type)
	}
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		notes, err := io.ReadAll(p.Open())
		if err != nil {
			return err
		}
		if hasNote(notes, f.ByteOrder, "Xen", xenElfnotePhys32Entry) {
			return nil
		}
	}
	return errors.New("the kernel has no PVH entry (XEN_ELFNOTE_PHYS32_ENTRY): it needs CONFIG_PVH")
}

// hasNote walks an ELF note segment.
func hasNote(b []byte, bo binary.ByteOrder, owner string, typ uint32) bool {
	for len(b) >= 12 {
		namesz, descsz, t := bo.Uint32(b), bo.Uint32(b[4:]), bo.Uint32(b[8:])
		b = b[12:]
		n, d := align4(int(namesz)), align4(int(descsz))
		if n < 0 || d < 0 || n+d > len(b) || int(namesz) > n {
			return false
		}
		name := strings.TrimRight(string(b[:namesz]), "\x00")
		if name == owner && t == typ {
			return true
		}
		b = b[n+d:]
	}
	return false
}

func align4(n int) int { return (n + 3) &^ 3 }
