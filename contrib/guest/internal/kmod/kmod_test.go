package kmod

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

// fakeModule builds a minimal ELF64 relocatable object holding a .modinfo
// section with the given key=value strings, as a kernel module has.
func fakeModule(kv ...string) []byte {
	modinfo := []byte(strings.Join(kv, "\x00") + "\x00")
	shstrtab := []byte("\x00.modinfo\x00.shstrtab\x00")
	const ehsize, shentsize = 64, 64
	modOff := ehsize
	strOff := modOff + len(modinfo)
	shOff := (strOff + len(shstrtab) + 7) &^ 7
	var b bytes.Buffer
	le := binary.LittleEndian
	ident := [16]byte{0x7f, 'E', 'L', 'F', 2, 1, 1}
	b.Write(ident[:])
	binary.Write(&b, le, uint16(1))         // ET_REL
	binary.Write(&b, le, uint16(62))        // EM_X86_64
	binary.Write(&b, le, uint32(1))         // version
	binary.Write(&b, le, uint64(0))         // entry
	binary.Write(&b, le, uint64(0))         // phoff
	binary.Write(&b, le, uint64(shOff))     // shoff
	binary.Write(&b, le, uint32(0))         // flags
	binary.Write(&b, le, uint16(ehsize))    // ehsize
	binary.Write(&b, le, uint16(0))         // phentsize
	binary.Write(&b, le, uint16(0))         // phnum
	binary.Write(&b, le, uint16(shentsize)) // shentsize
	binary.Write(&b, le, uint16(3))         // shnum
	binary.Write(&b, le, uint16(2))         // shstrndx
	b.Write(modinfo)
	b.Write(shstrtab)
	b.Write(make([]byte, shOff-b.Len()))
	section := func(name, typ uint32, off, size int) {
		binary.Write(&b, le, name)
		binary.Write(&b, le, typ)
		binary.Write(&b, le, uint64(0)) // flags
		binary.Write(&b, le, uint64(0)) // addr
		binary.Write(&b, le, uint64(off))
		binary.Write(&b, le, uint64(size))
		binary.Write(&b, le, uint32(0)) // link
		binary.Write(&b, le, uint32(0)) // info
		binary.Write(&b, le, uint64(1)) // addralign
		binary.Write(&b, le, uint64(0)) // entsize
	}
	section(0, 0, 0, 0)
	section(1, 1, modOff, len(modinfo))   // PROGBITS
	section(10, 3, strOff, len(shstrtab)) // STRTAB
	return b.Bytes()
}

func TestReadInfo(t *testing.T) {
	tests := []struct {
		name    string
		file    string
		kv      []string
		want    Info
		wantErr bool
	}{
		{"deps", "kernel/fs/9p/9p.ko", []string{"license=GPL", "depends=9pnet,netfs,fscache", "name=9p"},
			Info{Name: "9p", Depends: []string{"9pnet", "netfs", "fscache"}}, false},
		{"no deps, dashes", "kernel/x/virtio-rng.ko", []string{"depends="},
			Info{Name: "virtio_rng"}, false},
		{"softdep", "a.ko", []string{"softdep=pre: crc32c post: foo", "depends=b"},
			Info{Name: "a", Depends: []string{"b"}, SoftPre: []string{"crc32c"}}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ReadInfo(tc.file, fakeModule(tc.kv...))
			if (err != nil) != tc.wantErr {
				t.Fatalf("err %v", err)
			}
			if got.Name != tc.want.Name || strings.Join(got.Depends, ",") != strings.Join(tc.want.Depends, ",") ||
				strings.Join(got.SoftPre, ",") != strings.Join(tc.want.SoftPre, ",") {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestReadInfoMalformed(t *testing.T) {
	good := fakeModule("depends=")
	for i, in := range [][]byte{nil, []byte("not an elf"), good[:70], append(append([]byte{}, good[:64]...), bytes.Repeat([]byte{0xff}, 300)...)} {
		if _, err := ReadInfo("x.ko", in); err == nil {
			t.Errorf("input %d: no error", i)
		}
	}
}

func TestResolve(t *testing.T) {
	s := NewSet()
	mods := map[string][]string{
		"kernel/drivers/virtio/virtio.ko":                {"depends="},
		"kernel/drivers/virtio/virtio_ring.ko":           {"depends=virtio"},
		"kernel/drivers/virtio/virtio_pci.ko":            {"depends=virtio_ring,virtio,virtio_pci_modern_dev"},
		"kernel/drivers/virtio/virtio_pci_modern_dev.ko": {"depends="},
		"kernel/drivers/char/virtio_console.ko":          {"depends=virtio_ring,virtio"},
		"kernel/fs/9p/9p.ko":                             {"depends=9pnet,netfs", "softdep=pre: missing_soft"},
		"kernel/net/9p/9pnet.ko":                         {"depends="},
		"kernel/fs/netfs/netfs.ko":                       {"depends=fscache"},
		"kernel/x/cyc_a.ko":                              {"depends=cyc_b"},
		"kernel/x/cyc_b.ko":                              {"depends=cyc_a"},
		"kernel/x/needs_gone.ko":                         {"depends=gone"},
	}
	for f, kv := range mods {
		if err := s.Add(f, fakeModule(kv...)); err != nil {
			t.Fatal(err)
		}
	}
	s.AddBuiltin([]byte("kernel/fs/fscache/fscache.ko\nkernel/drivers/virt/vmgenid.ko\n"))
	tests := []struct {
		want    []string
		order   string
		errIs   error
		errText string
	}{
		{want: []string{"virtio_pci", "virtio_console"}, order: "virtio virtio_pci_modern_dev virtio_ring virtio_pci virtio_console"},
		{want: []string{"9p"}, order: "9pnet netfs 9p"},
		{want: []string{"vmgenid"}, order: ""},
		{want: []string{"virtio-console"}, order: "virtio virtio_ring virtio_console"},
		{want: []string{"nope"}, errIs: ErrNotFound},
		{want: []string{"needs_gone"}, errIs: ErrNotFound, errText: "needs_gone"},
		{want: []string{"cyc_a"}, errText: "cycle"},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.want, ","), func(t *testing.T) {
			got, err := s.Resolve(tc.want)
			if tc.errIs != nil || tc.errText != "" {
				if err == nil || (tc.errIs != nil && !errors.Is(err, tc.errIs)) || !strings.Contains(err.Error(), tc.errText) {
					t.Fatalf("err %v, want %v %q", err, tc.errIs, tc.errText)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if strings.Join(got, " ") != tc.order {
				t.Errorf("order %q, want %q", strings.Join(got, " "), tc.order)
			}
		})
	}
}
