//go:build e2e || bench || conformance || pkg || kube

package integration

import (
	"os"
	"os/exec"
	"syscall"
)

func statIno(st os.FileInfo) uint64 {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return s.Ino
	}
	return 0
}

func execOut(name string, args ...string) (string, error) {
	b, err := exec.Command(name, args...).Output()
	return string(b), err
}
