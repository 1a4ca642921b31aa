package images

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"
)

// CacheDir is where image builds keep what they download (Debian
// packages). Set it before building; empty means a folder under the
// system's temporary directory.
var CacheDir string

func cacheDir() string {
	if CacheDir != "" {
		return CacheDir
	}
	return filepath.Join(os.TempDir(), "kuasar-images")
}

var aptMu sync.Mutex

// debFile returns one file of a Debian package. The package is downloaded
// (not installed) with apt-get into the cache, once.
func debFile(pkg, file string) ([]byte, error) {
	aptMu.Lock()
	defer aptMu.Unlock()
	dir := filepath.Join(cacheDir(), "debs")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	debs, _ := filepath.Glob(filepath.Join(dir, pkg+"_*.deb"))
	if len(debs) == 0 {
		download := func() error {
			cmd := exec.Command("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", pkg)
			cmd.Dir = dir
			if out, err := cmd.CombinedOutput(); err != nil {
				return fmt.Errorf("apt-get download %s: %w: %s", pkg, err, out)
			}
			return nil
		}
		if err := download(); err != nil {
			// The package lists may be missing or stale.
			if out, uerr := exec.Command("apt-get", "update", "-qq").CombinedOutput(); uerr != nil {
				return nil, fmt.Errorf("%w (apt-get update: %v: %s)", err, uerr, out)
			}
			if err := download(); err != nil {
				return nil, err
			}
		}
		if debs, _ = filepath.Glob(filepath.Join(dir, pkg+"_*.deb")); len(debs) == 0 {
			return nil, fmt.Errorf("apt-get download %s left no .deb in %s", pkg, dir)
		}
	}
	out, err := exec.Command("dpkg-deb", "--fsys-tarfile", debs[0]).Output()
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", debs[0], err)
	}
	tr := tar.NewReader(bytes.NewReader(out))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil, fmt.Errorf("%s has no %s", debs[0], file)
		}
		if err != nil {
			return nil, fmt.Errorf("reading %s: %w", debs[0], err)
		}
		if path.Clean("/"+h.Name) == file {
			return io.ReadAll(tr)
		}
	}
}

// libDirs are where the host's shared libraries are looked for.
var libDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"}

// sharedLibraries lists the host paths of the loader and the shared
// libraries a dynamic executable needs, recursively.
func sharedLibraries(exe []byte) ([]string, error) {
	seen := map[string]bool{}
	var walk func(data []byte) error
	walk = func(data []byte) error {
		f, err := elf.NewFile(bytes.NewReader(data))
		if err != nil {
			return err
		}
		defer f.Close()
		var deps []string
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				b, err := io.ReadAll(p.Open())
				if err != nil {
					return err
				}
				deps = append(deps, strings.TrimRight(string(b), "\x00"))
			}
		}
		needed, err := f.ImportedLibraries()
		if err != nil {
			return err
		}
		for _, n := range needed {
			found := ""
			for _, d := range libDirs {
				if _, err := os.Stat(filepath.Join(d, n)); err == nil {
					found = filepath.Join(d, n)
					break
				}
			}
			if found == "" {
				return fmt.Errorf("shared library %s not found in %v", n, libDirs)
			}
			deps = append(deps, found)
		}
		for _, d := range deps {
			if seen[d] {
				continue
			}
			seen[d] = true
			b, err := os.ReadFile(d)
			if err != nil {
				return err
			}
			if err := walk(b); err != nil {
				return fmt.Errorf("%s: %w", d, err)
			}
		}
		return nil
	}
	if err := walk(exe); err != nil {
		return nil, err
	}
	var out []string
	for d := range seen {
		out = append(out, d)
	}
	sort.Strings(out)
	return out, nil
}

// dynamicFiles puts executables into an image with the shared libraries
// they need, taken from the host at the same paths. exes maps a path in
// the image to the executable's content.
func dynamicFiles(exes map[string][]byte) ([]File, error) {
	var files []File
	libs := map[string]bool{}
	for p, data := range exes {
		files = append(files, File{Path: p, Mode: 0o755, Data: data})
		deps, err := sharedLibraries(data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", p, err)
		}
		for _, d := range deps {
			libs[d] = true
		}
	}
	for l := range libs {
		data, err := os.ReadFile(l)
		if err != nil {
			return nil, err
		}
		files = append(files, File{Path: l, Mode: 0o755, Data: data})
	}
	return withParents(files), nil
}

// withParents adds the directories files need that are not listed.
func withParents(files []File) []File {
	have := map[string]bool{"/": true}
	for _, f := range files {
		if f.Dir {
			have[f.Path] = true
		}
	}
	out := files
	for _, f := range files {
		for d := path.Dir(f.Path); !have[d]; d = path.Dir(d) {
			have[d] = true
			out = append(out, File{Path: d, Dir: true, Mode: 0o755})
		}
	}
	return out
}

// compileC builds a static executable from C source.
func compileC(name string, source []byte) ([]byte, error) {
	dir, err := os.MkdirTemp("", name+"-build")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	src := filepath.Join(dir, name+".c")
	if err := os.WriteFile(src, source, 0o644); err != nil {
		return nil, err
	}
	bin := filepath.Join(dir, name)
	if out, err := exec.Command("gcc", "-Os", "-static", "-s", "-o", bin, src).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("compiling %s: %v: %s", name, err, out)
	}
	return os.ReadFile(bin)
}
