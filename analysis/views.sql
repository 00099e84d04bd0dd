-- imagefab analysis views: the catalog joined with people's review decisions.
--
-- In the DuckDB CLI (local outputs):
--     SET VARIABLE imagefab_output = '/path/to/output';
--     .read analysis/views.sql
--     SELECT outcome, count(*) FROM images GROUP BY ALL;
--     SELECT image_id, score, prompt FROM search_images('red leather boot') LIMIT 5;
-- In Python, `analysis.connect(output)` defines the three sources itself (for any OutputStore URI,
-- object storage included) and runs everything after the `imagefab:views` line.

-- Sources. Decisions may not exist yet: read_parquet fails on a glob that matches nothing, so the
-- query text is chosen once, when this file is read (`.read` it again to see new decision files).
-- Catalogs written before a column existed lack it: the empty row adds the columns the views use.
CREATE OR REPLACE VIEW catalog_source AS
SELECT * FROM read_parquet(getvariable('imagefab_output') || '/catalog/**/*.parquet',
                           hive_partitioning = true, union_by_name = true,
                           hive_types = {'date': DATE, 'run_id': VARCHAR})
-- Columns newer than some catalogs: present (null) even when no file has them yet.
UNION ALL BY NAME SELECT NULL::VARCHAR AS combination, NULL::VARCHAR AS row_group,
    NULL::STRUCT(name VARCHAR, endpoint_host VARCHAR, provider_model VARCHAR, request_id VARCHAR, seed BIGINT,
                 reproducible BOOLEAN, unhonoured VARCHAR[], api_cost_usd DOUBLE) AS backend,
    NULL::STRUCT(mode VARCHAR, image_uri VARCHAR, image_sha256 VARCHAR, mask_uri VARCHAR, mask_sha256 VARCHAR,
                 mask_source VARCHAR, strength DOUBLE, mask_blur INTEGER, blend_px INTEGER, target VARCHAR,
                 anchor VARCHAR, fill VARCHAR, resize_mode VARCHAR, scale DOUBLE, tile INTEGER,
                 tile_overlap INTEGER, source_width INTEGER, source_height INTEGER, kept_mean_abs DOUBLE,
                 kept_max_abs DOUBLE, kept_pixels BIGINT, seam DOUBLE, seam_input DOUBLE, tile_seam DOUBLE,
                 source_difference DOUBLE, generated_sharpness DOUBLE) AS conditioning
WHERE false;
SET VARIABLE imagefab_decisions_sql = CASE
    WHEN (SELECT count(*) FROM glob(getvariable('imagefab_output') || '/reviews/decisions/**/*.parquet')) > 0
    THEN 'SELECT * FROM read_parquet(''' || replace(getvariable('imagefab_output'), '''', '''''')
         || '/reviews/decisions/**/*.parquet'', hive_partitioning = true, union_by_name = true)'
    ELSE 'SELECT NULL::VARCHAR AS image_id, NULL::VARCHAR AS decision, NULL::VARCHAR AS reviewer,
                 NULL::TIMESTAMPTZ AS decided_at, NULL::VARCHAR AS note WHERE false'
    END;
CREATE OR REPLACE VIEW decisions_source AS FROM query(getvariable('imagefab_decisions_sql'));
-- Every row is compared with the other rows of its image here; analysis.connect splits the
-- catalog into compacted files checked for one row per image (app/catalog/compact.py) and the rest.
CREATE OR REPLACE VIEW catalog_checked_source AS SELECT * FROM catalog_source WHERE false;
CREATE OR REPLACE VIEW catalog_tail_source AS SELECT * FROM catalog_source;
CREATE OR REPLACE VIEW catalog_contested_ids AS SELECT NULL::VARCHAR AS image_id WHERE false;
-- Master PNG sizes (images/<id[:2]>/<id>.png); read_blob reads sizes without the contents.
CREATE OR REPLACE VIEW image_files AS
SELECT regexp_extract(filename, '([0-9a-f]+)\.png$', 1) AS image_id, size AS bytes
FROM read_blob(getvariable('imagefab_output') || '/images/*/*.png');

-- imagefab:views

-- Every catalog row as written, `date` as a DATE.
CREATE OR REPLACE VIEW catalog AS
SELECT * REPLACE (CAST(date AS DATE) AS date) FROM catalog_source;

-- Every decision ever recorded (app/review.py), and the one in force per image: the latest.
CREATE OR REPLACE VIEW decisions AS
SELECT image_id, decision, reviewer, decided_at, note FROM decisions_source;

CREATE OR REPLACE VIEW latest_decisions AS
SELECT * FROM decisions
QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY decided_at DESC, decision) = 1;

-- One row per image: its latest catalog row (a rerun may append a second row for an id that
-- failed before), `approval` from the latest decision, and what the image ended up as:
--   outcome  accepted (QC accepted, or a person approved) | rejected (QC or a person) |
--            review (waiting for a person) | failed (no image)
--   model_stack  the base model and LoRA stack as rendered: `tiny-sdxl:1 + tiny-style:1@0.8`
--                (`combination` is the spec's name for a stack and its settings; names are per spec)
--   master_bytes the master PNG's size (null where file sizes were not listed)
--
-- catalog_latest: the latest row of each image. A row of a checked compacted file
-- (catalog_checked_source) whose id is not contested and has no row in the other files
-- (catalog_tail_source) is its image's only row, so only the rest are ranked: the window over
-- the whole catalog was the cost of every query. This form reads the checked files twice;
-- analysis.connect ranks the unsure rows once instead and reads the catalog in one pass.
CREATE OR REPLACE VIEW catalog_latest AS
WITH contested AS (
    SELECT image_id FROM catalog_tail_source WHERE image_id IS NOT NULL
    UNION SELECT image_id FROM catalog_contested_ids WHERE image_id IS NOT NULL)
SELECT * REPLACE (CAST(date AS DATE) AS date) FROM catalog_checked_source
WHERE image_id IS NOT NULL AND image_id NOT IN (SELECT image_id FROM contested)
UNION ALL
SELECT * REPLACE (CAST(date AS DATE) AS date) FROM (
    SELECT * FROM catalog_checked_source WHERE image_id IS NULL OR image_id IN (SELECT image_id FROM contested)
    UNION ALL SELECT * FROM catalog_tail_source)
QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY created_at DESC, run_id DESC) = 1;

CREATE OR REPLACE VIEW images AS
WITH latest AS (SELECT * FROM catalog_latest), stacked AS (
    SELECT *,
           array_to_string(list_transform(loras, lambda l: l.name || ':' || l.version || '@' || l.weight), ' + ')
               AS lora_stack
    FROM latest
)
SELECT c.* REPLACE (coalesce(d.decision, c.approval, 'pending') AS approval),
       d.reviewer, d.decided_at, d.note AS review_note,
       CASE WHEN c.status = 'failed' THEN 'failed'
            WHEN d.decision = 'rejected' THEN 'rejected'
            WHEN d.decision = 'approved' THEN 'accepted'
            ELSE c.status END AS outcome,
       coalesce(c.base_model.name || ':' || c.base_model.version, '(none)')
           || CASE WHEN c.lora_stack <> '' THEN ' + ' || c.lora_stack ELSE '' END AS model_stack,
       coalesce(c.bytes, f.bytes) AS master_bytes,
       coalesce(list_sum(list_transform(c.variants, lambda v: v.bytes)), 0) AS variant_bytes
FROM stacked c
LEFT JOIN latest_decisions d USING (image_id)
LEFT JOIN (SELECT image_id, max(bytes) AS bytes FROM image_files GROUP BY image_id) f USING (image_id);

-- Acceptance and mean QC scores per template / template variable value / combination.
-- acceptance_rate = accepted / rendered (failed rows rendered nothing; images waiting for review
-- count as not accepted yet); attempts_per_accepted = rendered / accepted, what a quota
-- (`variations.accepted_per_row`) pays per accepted image (null: nothing accepted yet).
CREATE OR REPLACE VIEW acceptance_by_template AS
SELECT coalesce(template.name, '(no template)') AS template, template.version AS version,
       count(*) AS images,
       count(*) FILTER (outcome = 'accepted') AS accepted,
       count(*) FILTER (outcome = 'review') AS review,
       count(*) FILTER (outcome = 'rejected') AS rejected,
       count(*) FILTER (outcome = 'failed') AS failed,
       round(count(*) FILTER (outcome = 'accepted') / nullif(count(*) FILTER (outcome <> 'failed'), 0), 4) AS acceptance_rate,
       round(count(*) FILTER (outcome <> 'failed') / nullif(count(*) FILTER (outcome = 'accepted'), 0), 2) AS attempts_per_accepted,
       round(avg(sharpness), 2) AS mean_sharpness, round(avg(contrast), 4) AS mean_contrast,
       round(avg(exposure), 4) AS mean_exposure, round(avg(clip_score), 4) AS mean_clip_score
FROM images GROUP BY ALL;

-- Attempts per accepted image per template version, combination and tier.
CREATE OR REPLACE VIEW attempts_per_accepted AS
SELECT coalesce(template.name, '(no template)') AS template, template.version AS version,
       coalesce(combination, '') AS combination, coalesce(tier, '') AS tier,
       count(*) FILTER (outcome <> 'failed') AS rendered,
       count(*) FILTER (outcome = 'accepted') AS accepted,
       round(count(*) FILTER (outcome <> 'failed') / nullif(count(*) FILTER (outcome = 'accepted'), 0), 2) AS attempts_per_accepted,
       count(DISTINCT row_group) AS row_groups,
       round(sum(cost_usd) / nullif(count(*) FILTER (outcome = 'accepted'), 0), 8) AS usd_per_accepted
FROM images GROUP BY ALL;

-- Images sharing a template and a variables map are counted once per map, and only those few
-- groups are unnested: a lateral unnest of every image's map read every column of every image.
CREATE OR REPLACE VIEW acceptance_by_variable AS
WITH per_map AS (
    SELECT coalesce(template.name, '(no template)') AS template, variables,
           count(*) AS images,
           count(*) FILTER (outcome = 'accepted') AS accepted,
           count(*) FILTER (outcome = 'review') AS review,
           count(*) FILTER (outcome = 'rejected') AS rejected,
           count(*) FILTER (outcome = 'failed') AS failed,
           count(*) FILTER (outcome <> 'failed') AS rendered,
           sum(sharpness) AS sharpness_sum, count(sharpness) AS sharpness_n,
           sum(contrast) AS contrast_sum, count(contrast) AS contrast_n,
           sum(exposure) AS exposure_sum, count(exposure) AS exposure_n,
           sum(clip_score) AS clip_score_sum, count(clip_score) AS clip_score_n
    FROM images WHERE variables IS NOT NULL GROUP BY template, variables),
entries AS (SELECT * EXCLUDE (variables), unnest(map_entries(variables)) AS v FROM per_map)
SELECT template, v.key AS variable, v.value AS value,
       sum(images)::BIGINT AS images, sum(accepted)::BIGINT AS accepted, sum(review)::BIGINT AS review,
       sum(rejected)::BIGINT AS rejected, sum(failed)::BIGINT AS failed,
       round(sum(accepted) / nullif(sum(rendered), 0), 4) AS acceptance_rate,
       round(sum(sharpness_sum) / nullif(sum(sharpness_n), 0), 2) AS mean_sharpness,
       round(sum(contrast_sum) / nullif(sum(contrast_n), 0), 4) AS mean_contrast,
       round(sum(exposure_sum) / nullif(sum(exposure_n), 0), 4) AS mean_exposure,
       round(sum(clip_score_sum) / nullif(sum(clip_score_n), 0), 4) AS mean_clip_score
FROM entries GROUP BY template, v.key, v.value;

CREATE OR REPLACE VIEW acceptance_by_combination AS
SELECT coalesce(combination, '') AS combination, model_stack,
       count(*) AS images,
       count(*) FILTER (outcome = 'accepted') AS accepted,
       count(*) FILTER (outcome = 'review') AS review,
       count(*) FILTER (outcome = 'rejected') AS rejected,
       count(*) FILTER (outcome = 'failed') AS failed,
       round(count(*) FILTER (outcome = 'accepted') / nullif(count(*) FILTER (outcome <> 'failed'), 0), 4) AS acceptance_rate,
       round(count(*) FILTER (outcome <> 'failed') / nullif(count(*) FILTER (outcome = 'accepted'), 0), 2) AS attempts_per_accepted,
       round(avg(sharpness), 2) AS mean_sharpness, round(avg(contrast), 4) AS mean_contrast,
       round(avg(exposure), 4) AS mean_exposure, round(avg(clip_score), 4) AS mean_clip_score
FROM images GROUP BY ALL;

-- Full-text search over prompts, negative prompts and tag values, ranked by BM25 — plain SQL, so
-- it needs no extension. Tokens: lower case, accents stripped, split on anything but a-z0-9,
-- plurals folded (boots -> boot, accessories -> accessory). The scoring is that of DuckDB's fts
-- extension (`match_bm25`: k = 1.2, b = 0.75, idf = log10((N - df + 0.5) / (df + 0.5) + 1),
-- document length over all fields).
CREATE OR REPLACE MACRO imagefab_stem(t) AS
    CASE WHEN length(t) > 4 AND suffix(t, 'ies') AND NOT (suffix(t, 'eies') OR suffix(t, 'aies'))
             THEN t[:length(t) - 3] || 'y'
         WHEN length(t) > 3 AND suffix(t, 's') AND NOT (suffix(t, 'us') OR suffix(t, 'ss'))
             THEN t[:length(t) - 1]
         ELSE t END;

CREATE OR REPLACE MACRO imagefab_tokens(s) AS
    list_filter(list_transform(regexp_split_to_array(lower(strip_accents(coalesce(s, ''))), '[^a-z0-9]+'),
                               lambda t: imagefab_stem(t)),
                lambda t: t <> '');

CREATE OR REPLACE VIEW search_terms AS
SELECT image_id, field, unnest(imagefab_tokens(text)) AS term
FROM (SELECT image_id, 'prompt' AS field, prompt AS text FROM images
      UNION ALL SELECT image_id, 'negative_prompt', negative_prompt FROM images
      UNION ALL SELECT image_id, 'tags', array_to_string(map_values(tags), ' ') FROM images);

-- search_images('red leather boot' [, fields := 'prompt,tags'] [, conjunctive := true]):
-- every column of `images` plus `score`, best first.
CREATE OR REPLACE MACRO search_images(query_string, fields := NULL, conjunctive := false, k := 1.2, b := 0.75) AS TABLE
WITH q AS (SELECT DISTINCT unnest(imagefab_tokens(query_string)) AS term),
terms AS MATERIALIZED (SELECT * FROM search_terms),
doc_len AS (SELECT i.image_id, count(t.term) AS len
            FROM (SELECT image_id FROM images) i LEFT JOIN terms t USING (image_id) GROUP BY i.image_id),
stats AS (SELECT count(*) AS n, avg(len) AS avgdl FROM doc_len),
df AS (SELECT term, count(DISTINCT image_id) AS df FROM terms WHERE term IN (SELECT term FROM q) GROUP BY term),
tf AS (SELECT image_id, term, count(*) AS tf FROM terms
       WHERE term IN (SELECT term FROM q)
         AND (fields IS NULL OR list_contains(string_split(replace(fields, ' ', ''), ','), field))
       GROUP BY image_id, term),
matched AS (SELECT image_id FROM tf GROUP BY image_id
            HAVING NOT conjunctive OR count(DISTINCT term) = (SELECT count(*) FROM q)),
scores AS (
    SELECT tf.image_id,
           sum(log((stats.n - df.df + 0.5) / (df.df + 0.5) + 1)
               * (tf.tf * (k + 1) / (tf.tf + k * (1 - b + b * doc_len.len / stats.avgdl)))) AS score
    FROM tf JOIN matched USING (image_id) JOIN df USING (term) JOIN doc_len USING (image_id), stats
    GROUP BY tf.image_id)
SELECT i.*, s.score FROM scores s JOIN images i USING (image_id)
ORDER BY round(s.score, 9) DESC, i.image_id;

-- search_scores('red leather boot' [, fields := …] [, conjunctive := …] [, top := N]): image_id and
-- score only (the persistent index, analysis/search_index.py, answers it without reading the
-- catalog rows; given `top`, it may leave out what cannot be among the first N rows).
CREATE OR REPLACE MACRO search_scores(query_string, fields := NULL, conjunctive := false, top := NULL) AS TABLE
SELECT image_id, score FROM search_images(query_string, fields := fields, conjunctive := conjunctive);
