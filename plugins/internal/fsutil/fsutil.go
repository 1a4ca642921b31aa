// Package fsutil holds the small file helpers the plugins share.
package fsutil

import (
	"os"

	"github.com/containerd/containerd/v2/pkg/atomicfile"
)

// WriteFileAtomic replaces path with data through a synced temporary file
// and a rename, so a crash leaves either the old or the new content.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	f, err := atomicfile.New(path, perm)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Cancel()
		return err
	}
	return f.Close()
}
