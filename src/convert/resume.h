// Copyright 2026 The zqcow Authors. Licensed under the Apache License, Version 2.0.
//
// What lets `zqcow convert --resume` continue an interrupted conversion, and only one that
// would produce the same image: the resume record, a small text file beside the partial
// image (target.h names both), written and synced before the partial image is created.
//
// The record holds the conversion's options that shape the output (virtual size, cluster
// size, compression and its level, refcount width, source format, backing file and
// bitmap) and the identity of every file the source reads (its own and a qcow2 source's
// backing chain): a regular file by device, inode, size, modification and change time in
// nanoseconds; a block device by path only, since nothing on it says whether it changed
// (its resume needs the user's word, ConvertOptions::source_unchanged).
//
// Format (version 1): the line "zqcow-partial 1", then one "key=value" line per field in
// a fixed order; values escape '\' as "\\" and a newline as "\n".

#ifndef ZQCOW_CONVERT_RESUME_H_
#define ZQCOW_CONVERT_RESUME_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "convert/source.h"
#include "zqcow/convert.h"
#include "zqcow/status.h"

namespace zqcow::convert {

// key -> value, in the record's order.
using ResumeRecord = std::vector<std::pair<std::string, std::string>>;

// The record of converting `source` with `options` into an image of `virtual_size` bytes.
// Fails (naming the file) when a file of the source cannot be stat'ed.
Result<ResumeRecord> DescribeConversion(const Source& source, const ConvertOptions& options,
                                        uint64_t virtual_size);

// Creates `path` (which must not exist), writes the record and syncs it.
Status WriteResumeRecord(const std::string& path, const ResumeRecord& record);
// Reads a record written by WriteResumeRecord; kCorruption naming `path` when it is not one.
Result<ResumeRecord> ReadResumeRecord(const std::string& path);

// OK when the conversion `current` describes may continue the interrupted one `stored`
// describes (the image at `partial`): same options, and every source file unchanged. A
// block device source counts as unchanged only with `source_unchanged` (the user's word).
// Otherwise kInvalidArgument with one line saying what differs, naming the source file
// or the option, and how to start over.
Status CheckResumable(const ResumeRecord& stored, const ResumeRecord& current,
                      const std::string& partial, bool source_unchanged);

// `source`, but with `present` (sorted, disjoint guest ranges, e.g. the clusters a partial
// image already holds) left out of DataRanges and DirtyRanges: the pipeline reads and
// writes only the rest and counts the present ranges as skipped.
std::unique_ptr<Source> SkipPresentRanges(std::unique_ptr<Source> source,
                                          std::vector<ByteRange> present);

}  // namespace zqcow::convert

#endif  // ZQCOW_CONVERT_RESUME_H_
