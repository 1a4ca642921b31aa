// Package kmod picks the kernel modules the kuasar-vmm guest loads and puts
// them in load order. A kernel package (Debian's linux-image-*) ships its
// modules without modules.dep (depmod runs at install time), so the
// dependencies are read from each module's own .modinfo section.
package kmod

import (
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"path"
	"sort"
	"strings"
)

// Name normalises a module name as the kernel does: dashes become
// underscores, and a file name loses its directory and .ko suffix.
func Name(file string) string {
	n := path.Base(file)
	for _, ext := range []string{".ko.xz", ".ko.zst", ".ko.gz", ".ko"} {
		if strings.HasSuffix(n, ext) {
			n = strings.TrimSuffix(n, ext)
			break
		}
	}
	return strings.ReplaceAll(n, "-", "_")
}

// Info is what a module says about itself in its .modinfo section.
type Info struct {
	Name    string
	Depends []string
	// SoftPre are soft dependencies to load before ("softdep=pre: ...").
	SoftPre []string
}

// ReadInfo parses the .modinfo section of a module (an ELF relocatable
// object). It never panics on malformed input.
func ReadInfo(file string, ko []byte) (info Info, err error) {
	defer func() {
		// debug/elf has panicked on crafted input before; a bad module is an error.
		if r := recover(); r != nil {
			err = fmt.Errorf("%s: malformed ELF: %v", file, r)
		}
	}()
	f, err := elf.NewFile(bytes.NewReader(ko))
	if err != nil {
		return Info{}, fmt.Errorf("%s: %w", file, err)
	}
	s := f.Section(".modinfo")
	if s == nil {
		return Info{}, fmt.Errorf("%s: no .modinfo section", file)
	}
	data, err := s.Data()
	if err != nil {
		return Info{}, fmt.Errorf("%s: .modinfo: %w", file, err)
	}
	info.Name = Name(file)
	for _, kv := range bytes.Split(data, []byte{0}) {
		k, v, ok := strings.Cut(string(kv), "=")
		if !ok {
			continue
		}
		switch k {
		case "name":
			info.Name = Name(v)
		case "depends":
			for _, d := range strings.Split(v, ",") {
				if d = strings.TrimSpace(d); d != "" {
					info.Depends = append(info.Depends, Name(d))
				}
			}
		case "softdep":
			// "pre: a b post: c"
			pre := false
			for _, w := range strings.Fields(v) {
				switch w {
				case "pre:":
					pre = true
				case "post:":
					pre = false
				default:
					if pre {
						info.SoftPre = append(info.SoftPre, Name(w))
					}
				}
			}
		}
	}
	return info, nil
}

// Set is every module of a kernel, by name.
type Set struct {
	// Files maps a module name to its path in the package.
	Files map[string]string
	// Infos maps a module name to its info.
	Infos map[string]Info
	// Builtin holds the names of modules compiled into the kernel
	// (modules.builtin): asking for one needs no file.
	Builtin map[string]bool
}

// NewSet returns an empty set.
func NewSet() *Set {
	return &Set{Files: map[string]string{}, Infos: map[string]Info{}, Builtin: map[string]bool{}}
}

// Add records a module file of the package.
func (s *Set) Add(file string, ko []byte) error {
	info, err := ReadInfo(file, ko)
	if err != nil {
		return err
	}
	s.Files[info.Name] = file
	s.Infos[info.Name] = info
	return nil
}

// AddBuiltin records the content of modules.builtin.
func (s *Set) AddBuiltin(list []byte) {
	for _, l := range strings.Split(string(list), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			s.Builtin[Name(l)] = true
		}
	}
}

// ErrNotFound is returned for a wanted module the kernel has neither as a
// module nor built in.
var ErrNotFound = errors.New("kernel module not found")

// Resolve returns the modules to load for want, dependencies first, each
// once. Built-in modules are left out. Optional modules (soft
// dependencies) are included when the kernel has them.
func (s *Set) Resolve(want []string) ([]string, error) {
	var order []string
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(n string, chain []string, soft bool) error
	visit = func(n string, chain []string, soft bool) error {
		n = Name(n)
		switch state[n] {
		case 2:
			return nil
		case 1:
			return fmt.Errorf("kernel module dependency cycle: %s", strings.Join(append(chain, n), " -> "))
		}
		if s.Builtin[n] {
			state[n] = 2
			return nil
		}
		info, ok := s.Infos[n]
		if !ok {
			if soft {
				return nil
			}
			return fmt.Errorf("%s (needed by %s): %w", n, strings.Join(chain, " -> "), ErrNotFound)
		}
		state[n] = 1
		chain = append(chain, n)
		for _, d := range info.SoftPre {
			if err := visit(d, chain, true); err != nil {
				return err
			}
		}
		deps := append([]string(nil), info.Depends...)
		sort.Strings(deps)
		for _, d := range deps {
			if err := visit(d, chain, false); err != nil {
				return err
			}
		}
		state[n] = 2
		order = append(order, n)
		return nil
	}
	for _, w := range want {
		if err := visit(w, nil, false); err != nil {
			return nil, err
		}
	}
	return order, nil
}
