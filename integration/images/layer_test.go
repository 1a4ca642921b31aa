package images

import (
	"archive/tar"
	"io"
	"testing"
)

// TestLayerHardLinks: a hard link is written after the file it links to
// (unpacking would fail otherwise), with that file's mode (unpacking
// applies a link's mode to the file).
func TestLayerHardLinks(t *testing.T) {
	l, err := Layer(withParents([]File{
		{Path: "/bin/[", HardLink: "/bin/busybox"},
		{Path: "/bin/sh", HardLink: "/bin/busybox"},
		{Path: "/bin/busybox", Mode: 0o755, Data: []byte("x")},
		{Path: "/usr/local/bin/nnp", Mode: 0o4755, Data: []byte("y")},
	}))
	if err != nil {
		t.Fatal(err)
	}
	rc, err := l.Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	seen := map[string]bool{}
	var order []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		order = append(order, h.Name)
		if h.Typeflag == tar.TypeLink {
			if !seen[h.Linkname] {
				t.Errorf("%s links to %s before it is written", h.Name, h.Linkname)
			}
			if h.Mode != 0o755 {
				t.Errorf("%s has mode %o, want its target's 755", h.Name, h.Mode)
			}
		}
		if h.Name == "usr/local/bin/nnp" && h.Mode != 0o4755 {
			t.Errorf("nnp has mode %o, want 4755", h.Mode)
		}
		seen[h.Name] = true
	}
	for _, d := range []string{"bin/", "usr/", "usr/local/", "usr/local/bin/"} {
		if !seen[d] {
			t.Errorf("directory %s missing from %v", d, order)
		}
	}
	if len(order) != 8 {
		t.Errorf("entries %v, want 4 files and 4 directories", order)
	}
}
