package main

import (
	"debug/elf"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
)

// libDirs are where the build host's dynamic loader finds libraries, and
// where the image puts them (the guest's loader searches the first one
// without an ld.so.cache).
var libDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"}

// guestLibDir is where libraries go in the image.
const guestLibDir = "/lib/x86_64-linux-gnu"

// sharedFile is a file a dynamic executable needs, and where it goes in
// the image.
type sharedFile struct {
	Host  string // file on the build host (symlinks resolved)
	Guest string // path in the image
}

// elfDeps returns the dynamic loader and the libraries, transitively, that
// the ELF executable bin needs; nothing for a static executable. find
// locates a library by its soname (see findLib).
func elfDeps(bin string, find func(soname string) (string, error)) ([]sharedFile, error) {
	interp, needed, err := readDynamic(bin)
	if err != nil {
		return nil, err
	}
	if interp == "" && len(needed) == 0 {
		return nil, nil
	}
	files := map[string]sharedFile{}
	if interp != "" {
		host, err := filepath.EvalSymlinks(interp)
		if err != nil {
			return nil, fmt.Errorf("%s: loader %s: %w", bin, interp, err)
		}
		files[interp] = sharedFile{Host: host, Guest: interp}
	}
	queue := needed
	seen := map[string]bool{}
	for len(queue) > 0 {
		so := queue[0]
		queue = queue[1:]
		if seen[so] {
			continue
		}
		seen[so] = true
		p, err := find(so)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", bin, err)
		}
		host, err := filepath.EvalSymlinks(p)
		if err != nil {
			return nil, err
		}
		guest := filepath.Join(guestLibDir, so)
		if interp != "" && filepath.Base(interp) == so {
			continue // the loader itself, already there
		}
		files[guest] = sharedFile{Host: host, Guest: guest}
		_, more, err := readDynamic(host)
		if err != nil {
			return nil, err
		}
		queue = append(queue, more...)
	}
	out := make([]sharedFile, 0, len(files))
	for _, f := range files {
		out = append(out, f)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Guest < out[j].Guest })
	return out, nil
}

// findLib looks a soname up in libDirs.
func findLib(soname string) (string, error) {
	for _, d := range libDirs {
		p := filepath.Join(d, soname)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("library %s not found in %v", soname, libDirs)
}

// readDynamic returns the PT_INTERP and DT_NEEDED entries of an ELF file.
func readDynamic(path string) (interp string, needed []string, err error) {
	f, err := elf.Open(path)
	if err != nil {
		return "", nil, fmt.Errorf("%s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			b := make([]byte, p.Filesz)
			if _, err := p.ReadAt(b, 0); err != nil {
				return "", nil, fmt.Errorf("%s: PT_INTERP: %w", path, err)
			}
			interp = string(b[:max(0, len(b)-1)])
		}
	}
	needed, err = f.ImportedLibraries()
	if err != nil && !errors.Is(err, elf.ErrNoSymbols) {
		return "", nil, fmt.Errorf("%s: %w", path, err)
	}
	return interp, needed, nil
}
