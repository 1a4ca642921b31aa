package main

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kuasar-io/containerd-kuasar/contrib/guest/internal/cpio"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
)

func TestParseAptShow(t *testing.T) {
	out := `Package: linux-image-amd64
Source: linux-signed-amd64 (6.1.192+3)
Version: 6.1.192-3
Depends: linux-image-6.1.0-57-amd64 (= 6.1.192-3)
SHA256: 4bf758c7
Description: Linux for 64-bit PCs (meta-package)
 continued line: with a colon

Package: other
Version: 1
`
	p, err := parseAptShow(out)
	if err != nil || p.Name != "linux-image-amd64" || p.Version != "6.1.192-3" || p.SHA256 != "4bf758c7" {
		t.Fatalf("%+v %v", p, err)
	}
	if dep := kernelDependency(p.Depends); dep != "linux-image-6.1.0-57-amd64" {
		t.Errorf("dependency %q", dep)
	}
	if dep := kernelDependency("kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool"); dep != "" {
		t.Errorf("a real kernel package followed to %q", dep)
	}
	if _, err := parseAptShow("N: Unable to locate package x\n"); err == nil {
		t.Error("no stanza accepted")
	}
}

func TestHasNote(t *testing.T) {
	note := func(name string, typ uint32, desc []byte) []byte {
		b := make([]byte, 12)
		binary.LittleEndian.PutUint32(b, uint32(len(name)+1))
		binary.LittleEndian.PutUint32(b[4:], uint32(len(desc)))
		binary.LittleEndian.PutUint32(b[8:], typ)
		n := append([]byte(name), 0)
		for len(n)%4 != 0 {
			n = append(n, 0)
		}
		return append(append(b, n...), desc...)
	}
	le := binary.LittleEndian
	seg := append(note("GNU", 3, make([]byte, 20)), note("Xen", xenElfnotePhys32Entry, make([]byte, 4))...)
	if !hasNote(seg, le, "Xen", xenElfnotePhys32Entry) {
		t.Error("PVH note not found")
	}
	if hasNote(seg[:len(seg)-3], le, "Xen", xenElfnotePhys32Entry) {
		t.Error("truncated note accepted")
	}
	if hasNote(note("Xen", 5, nil), le, "Xen", xenElfnotePhys32Entry) {
		t.Error("other Xen note taken for PVH")
	}
	bad := make([]byte, 12)
	le.PutUint32(bad, 0xffffffff)
	if hasNote(bad, le, "Xen", xenElfnotePhys32Entry) {
		t.Error("huge name size accepted")
	}
}

func TestKeyOf(t *testing.T) {
	a := keyOf([][2]string{{"agent", "1"}, {"runc", "2"}})
	if a != keyOf([][2]string{{"agent", "1"}, {"runc", "2"}}) || len(a) != 16 {
		t.Fatal("key not stable")
	}
	if a == keyOf([][2]string{{"agent", "1"}, {"runc", "3"}}) || a == keyOf([][2]string{{"agent", "1runc=2"}}) {
		t.Error("different inputs, same key")
	}
}

func TestInitramfsReproducible(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	agent := write("agent", "agent")
	runc := write("runc", "runc")
	libc := write("libc.so.6", "libc")
	write("modules/6.1/kernel/a.ko", "a")
	mods := []guest.Module{{Path: "6.1/kernel/a.ko", Early: true}}
	libs := []sharedFile{{Host: libc, Guest: "/lib/x86_64-linux-gnu/libc.so.6"}}
	for _, comp := range []string{"none", "gzip"} {
		m := guest.Manifest{Key: "k", Compression: comp}
		a, err := initramfs(m, dir, mods, agent, runc, libs)
		if err != nil {
			t.Fatal(err)
		}
		// Different modification times of the inputs change nothing.
		now := time.Now().Add(time.Hour)
		os.Chtimes(agent, now, now)
		b, err := initramfs(m, dir, mods, agent, runc, libs)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(a, b) {
			t.Errorf("%s: two builds differ", comp)
		}
		if comp != "none" {
			continue
		}
		hs, err := cpio.Read(a)
		if err != nil {
			t.Fatal(err)
		}
		var paths []string
		for _, h := range hs {
			paths = append(paths, h.Path)
		}
		all := strings.Join(paths, " ")
		for _, want := range []string{"init", "usr/bin/runc", "lib/x86_64-linux-gnu/libc.so.6", "lib/modules/6.1/kernel/a.ko", "lib/modules/kuasar.modules", "dev/console", "etc/kuasar/image.json"} {
			if !strings.Contains(" "+all+" ", " "+want+" ") {
				t.Errorf("initramfs lacks %s: %s", want, all)
			}
		}
	}
}

func TestElfDepsOfThisTest(t *testing.T) {
	// The test binary is a Go program: static unless cgo is on.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	deps, err := elfDeps(self, findLib)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range deps {
		if d.Host == "" || !filepath.IsAbs(d.Guest) {
			t.Errorf("bad dependency %+v", d)
		}
	}
	if _, err := elfDeps("/bin/sh", func(string) (string, error) { return "", os.ErrNotExist }); err == nil {
		t.Error("a dynamic executable with no libraries found passed")
	}
}
