package cpio

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestArchive(t *testing.T) {
	tests := []struct {
		name  string
		add   func(a *Archive) error
		paths []string
	}{
		{
			name:  "file with parents",
			add:   func(a *Archive) error { return a.AddFile("/usr/bin/runc", 0o755, []byte("elf")) },
			paths: []string{"usr", "usr/bin", "usr/bin/runc"},
		},
		{
			name: "sorted whatever the order of adding",
			add: func(a *Archive) error {
				for _, p := range []string{"z", "a/b", "a-b", "init"} {
					if err := a.AddFile(p, 0o644, nil); err != nil {
						return err
					}
				}
				return nil
			},
			paths: []string{"a", "a-b", "a/b", "init", "z"},
		},
		{
			name: "nodes and links",
			add: func(a *Archive) error {
				if err := a.AddCharDev("dev/console", 0o600, 5, 1); err != nil {
					return err
				}
				return a.AddSymlink("lib64", "lib")
			},
			paths: []string{"dev", "dev/console", "lib64"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := New()
			if err := tc.add(a); err != nil {
				t.Fatal(err)
			}
			b := a.Bytes()
			if len(b)%4 != 0 {
				t.Errorf("archive length %d is not 4-aligned", len(b))
			}
			hs, err := Read(b)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for i, h := range hs {
				got = append(got, h.Path)
				if h.Ino != uint32(i+1) || h.UID != 0 || h.GID != 0 || h.MTime != 0 {
					t.Errorf("%s: ino %d uid %d gid %d mtime %d", h.Path, h.Ino, h.UID, h.GID, h.MTime)
				}
			}
			if strings.Join(got, " ") != strings.Join(tc.paths, " ") {
				t.Errorf("paths %v, want %v", got, tc.paths)
			}
			if !bytes.Equal(b, a.Bytes()) {
				t.Error("two writes of one archive differ")
			}
		})
	}
}

func TestAddErrors(t *testing.T) {
	tests := []struct {
		name string
		add  func(a *Archive) error
	}{
		{"empty path", func(a *Archive) error { return a.AddFile("/", 0o644, nil) }},
		{"NUL", func(a *Archive) error { return a.AddFile("a\x00b", 0o644, nil) }},
		{"no type", func(a *Archive) error { return a.Add(Entry{Path: "x", Mode: 0o644}) }},
		{"file under a file", func(a *Archive) error {
			if err := a.AddFile("f", 0o644, nil); err != nil {
				return err
			}
			return a.AddFile("f/g", 0o644, nil)
		}},
		{"file over a directory", func(a *Archive) error {
			if err := a.AddDir("d", 0o755); err != nil {
				return err
			}
			return a.AddFile("d", 0o644, nil)
		}},
		{"trailer name", func(a *Archive) error { return a.AddFile(Trailer, 0o644, nil) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.add(New()); err == nil {
				t.Error("no error")
			}
		})
	}
}

func TestReadRejectsGarbage(t *testing.T) {
	a := New()
	_ = a.AddFile("init", 0o755, []byte("hello"))
	b := a.Bytes()
	for _, in := range [][]byte{nil, b[:50], b[:120], []byte(strings.Repeat("x", 200))} {
		if _, err := Read(in); err == nil {
			t.Errorf("Read(%q...) did not fail", in[:min(len(in), 10)])
		}
	}
}

// TestSystemCpio checks the archive against GNU cpio, where it is installed.
func TestSystemCpio(t *testing.T) {
	bin, err := exec.LookPath("cpio")
	if err != nil {
		t.Skip("GNU cpio is not installed; the format is checked by Read only")
	}
	a := New()
	_ = a.AddFile("init", 0o755, []byte("#!/bin/sh\n"))
	_ = a.AddSymlink("bin/sh", "/init")
	dir := t.TempDir()
	arch := filepath.Join(dir, "a.cpio")
	if err := os.WriteFile(arch, a.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("sh", "-c", bin+" -it --quiet < "+arch).CombinedOutput()
	if err != nil {
		t.Fatalf("cpio: %v: %s", err, out)
	}
	if got := strings.Fields(string(out)); strings.Join(got, " ") != "bin bin/sh init" {
		t.Errorf("cpio lists %q", out)
	}
}
