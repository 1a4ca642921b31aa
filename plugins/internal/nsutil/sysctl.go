package nsutil

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// SysctlNamespace returns the namespace a sysctl belongs to, or "" when it
// is not namespaced (and so may not be set for a pod).
func SysctlNamespace(name string) Kind {
	switch {
	case strings.HasPrefix(name, "net."):
		return Net
	case strings.HasPrefix(name, "fs.mqueue."),
		name == "kernel.msgmax", name == "kernel.msgmnb", name == "kernel.msgmni",
		name == "kernel.sem", name == "kernel.shmall", name == "kernel.shmmax",
		name == "kernel.shmmni", name == "kernel.shm_rmid_forced":
		return IPC
	case name == "kernel.hostname", name == "kernel.domainname":
		return UTS
	}
	return ""
}

// ApplySysctls writes sysctls inside the namespaces at paths. Every sysctl
// must belong to one of them.
func ApplySysctls(paths map[Kind]string, sysctls map[string]string) error {
	if len(sysctls) == 0 {
		return nil
	}
	names := make([]string, 0, len(sysctls))
	for name := range sysctls {
		k := SysctlNamespace(name)
		if k == "" {
			return fmt.Errorf("sysctl %q is not namespaced and cannot be set for a pod", name)
		}
		if _, ok := paths[k]; !ok {
			return fmt.Errorf("sysctl %q needs a pod %s namespace, but the pod shares the node's", name, k)
		}
		if strings.Contains(name, "..") || strings.ContainsAny(name, "/\x00") {
			return fmt.Errorf("invalid sysctl name %q", name)
		}
		names = append(names, name)
	}
	sort.Strings(names)
	return Do(paths, func() error {
		for _, name := range names {
			p := filepath.Join("/proc/sys", strings.ReplaceAll(name, ".", "/"))
			if err := os.WriteFile(p, []byte(sysctls[name]), 0o644); err != nil {
				return fmt.Errorf("setting sysctl %s=%q: %w", name, sysctls[name], err)
			}
		}
		return nil
	})
}
