// Package cpio writes the initramfs of the kuasar-vmm guest image: a cpio
// archive in the "newc" format the Linux kernel unpacks at boot.
//
// The archive is reproducible by construction: entries are written sorted by
// path, every directory on the way to a file gets an entry before it, inode
// numbers are assigned in that order, and owners and modification times are
// fixed. The same inputs give byte-identical archives.
package cpio

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"path"
	"sort"
	"strings"
)

// Mode bits of a newc header (the file type part of st_mode).
const (
	TypeDir     = 0o040000
	TypeRegular = 0o100000
	TypeSymlink = 0o120000
	TypeChar    = 0o020000
)

// Entry is one file of the archive.
type Entry struct {
	// Path inside the archive, absolute or relative; stored relative
	// ("init", "lib/modules/..."), as the kernel expects.
	Path string
	// Mode holds the file type (Type*) and the permission bits.
	Mode uint32
	// Data is a regular file's content, or a symlink's target.
	Data []byte
	// Major and Minor of a device node.
	Major, Minor uint32
}

// Archive collects entries and writes them in a reproducible order.
type Archive struct {
	entries map[string]Entry
	// MTime is the modification time of every entry (seconds since the
	// epoch); zero by default.
	MTime uint32
}

// New returns an empty archive.
func New() *Archive { return &Archive{entries: map[string]Entry{}} }

// Add adds e, replacing an earlier entry of the same path. Parent
// directories are added as needed (mode 0755).
func (a *Archive) Add(e Entry) error {
	p, err := clean(e.Path)
	if err != nil {
		return err
	}
	e.Path = p
	if e.Mode&0o170000 == 0 {
		return fmt.Errorf("cpio: %s: no file type in mode %o", p, e.Mode)
	}
	if old, ok := a.entries[p]; ok && old.Mode&0o170000 == TypeDir && e.Mode&0o170000 != TypeDir {
		return fmt.Errorf("cpio: %s is a directory", p)
	}
	for d := path.Dir(p); d != "."; d = path.Dir(d) {
		if old, ok := a.entries[d]; ok {
			if old.Mode&0o170000 != TypeDir {
				return fmt.Errorf("cpio: %s: parent %s is not a directory", p, d)
			}
			continue
		}
		a.entries[d] = Entry{Path: d, Mode: TypeDir | 0o755}
	}
	a.entries[p] = e
	return nil
}

// AddFile adds a regular file.
func (a *Archive) AddFile(p string, perm uint32, data []byte) error {
	return a.Add(Entry{Path: p, Mode: TypeRegular | perm&0o7777, Data: data})
}

// AddDir adds a directory.
func (a *Archive) AddDir(p string, perm uint32) error {
	return a.Add(Entry{Path: p, Mode: TypeDir | perm&0o7777})
}

// AddSymlink adds a symbolic link to target.
func (a *Archive) AddSymlink(p, target string) error {
	return a.Add(Entry{Path: p, Mode: TypeSymlink | 0o777, Data: []byte(target)})
}

// AddCharDev adds a character device node.
func (a *Archive) AddCharDev(p string, perm, major, minor uint32) error {
	return a.Add(Entry{Path: p, Mode: TypeChar | perm&0o7777, Major: major, Minor: minor})
}

// Paths returns the archive's paths in the order they are written.
func (a *Archive) Paths() []string {
	ps := make([]string, 0, len(a.entries))
	for p := range a.entries {
		ps = append(ps, p)
	}
	sort.Strings(ps)
	return ps
}

// WriteTo writes the archive, trailer included.
func (a *Archive) WriteTo(w io.Writer) (int64, error) {
	cw := &countWriter{w: w}
	for i, p := range a.Paths() {
		e := a.entries[p]
		if err := writeEntry(cw, uint32(i+1), a.MTime, e); err != nil {
			return cw.n, err
		}
	}
	if err := writeEntry(cw, 0, 0, Entry{Path: Trailer}); err != nil {
		return cw.n, err
	}
	return cw.n, nil
}

// Bytes returns the archive.
func (a *Archive) Bytes() []byte {
	var b bytes.Buffer
	_, _ = a.WriteTo(&b) // a bytes.Buffer does not fail
	return b.Bytes()
}

// Trailer is the name of the entry that ends a newc archive.
const Trailer = "TRAILER!!!"

const magic = "070701"

func writeEntry(w io.Writer, ino, mtime uint32, e Entry) error {
	nlink := uint32(1)
	if e.Mode&0o170000 == TypeDir {
		nlink = 2
	}
	if e.Path == Trailer {
		nlink = 1
	}
	name := e.Path + "\x00"
	hdr := fmt.Sprintf("%s%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		magic, ino, e.Mode, 0, 0, nlink, mtime, len(e.Data), 0, 0, e.Major, e.Minor, len(name), 0)
	var b bytes.Buffer
	b.WriteString(hdr)
	b.WriteString(name)
	pad(&b, b.Len())
	b.Write(e.Data)
	pad(&b, len(e.Data))
	_, err := w.Write(b.Bytes())
	return err
}

// pad aligns to 4 bytes: a header and its name together, then the data.
func pad(b *bytes.Buffer, n int) {
	if r := n % 4; r != 0 {
		b.Write(make([]byte, 4-r))
	}
}

func clean(p string) (string, error) {
	if strings.ContainsRune(p, 0) {
		return "", errors.New("cpio: NUL in path")
	}
	c := strings.TrimPrefix(path.Clean("/"+p), "/")
	if c == "" || c == Trailer {
		return "", fmt.Errorf("cpio: invalid path %q", p)
	}
	return c, nil
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// Header is one parsed entry header, as Read returns it.
type Header struct {
	Path         string
	Mode         uint32
	UID, GID     uint32
	MTime        uint32
	Ino          uint32
	Major, Minor uint32
	Data         []byte
}

// Read parses a newc archive (up to its trailer). It is the inverse of
// WriteTo, used to check images and in tests.
func Read(b []byte) ([]Header, error) {
	var out []Header
	off := 0
	for {
		if len(b)-off < 110 {
			return nil, fmt.Errorf("cpio: truncated header at %d", off)
		}
		h := b[off : off+110]
		if string(h[:6]) != magic {
			return nil, fmt.Errorf("cpio: bad magic at %d", off)
		}
		var f [13]uint32
		for i := range f {
			var v uint32
			if _, err := fmt.Sscanf(string(h[6+8*i:14+8*i]), "%08x", &v); err != nil {
				return nil, fmt.Errorf("cpio: bad header field at %d: %w", off, err)
			}
			f[i] = v
		}
		namesize, filesize := int(f[11]), int(f[6])
		nameEnd := off + 110 + namesize
		if namesize < 1 || nameEnd > len(b) {
			return nil, fmt.Errorf("cpio: bad name size at %d", off)
		}
		name := string(b[off+110 : nameEnd-1])
		dataOff := align4(nameEnd - off)
		dataOff += off
		if dataOff+filesize > len(b) {
			return nil, fmt.Errorf("cpio: truncated data of %s", name)
		}
		if name == Trailer {
			return out, nil
		}
		out = append(out, Header{
			Path: name, Ino: f[0], Mode: f[1], UID: f[2], GID: f[3], MTime: f[5],
			Major: f[9], Minor: f[10], Data: b[dataOff : dataOff+filesize],
		})
		off = dataOff + align4(filesize)
	}
}

func align4(n int) int { return (n + 3) &^ 3 }
